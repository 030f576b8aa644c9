// Command vbfs-vcsim runs govmomi's vCenter simulator (vcsim) on loopback for vbfs's tests.
//
// It is the stock simulator of govmomi 0.24 (Debian's golang-github-vmware-govmomi-dev) plus two behaviours that
// this version lacks and that changed-block tracking needs; both are ours, not VMware's or govmomi's:
//
//   - every snapshot gets its own copy of the VM's disks with a backing changeId ("52 <vm>/<n>");
//   - QueryChangedDiskAreas is answered from a JSON file that a test writes beside the disk,
//     <datastore>/<vm>/<disk>-changes.json: {"<changeId>": [[offset, length], ...]} lists the areas changed since
//     that changeId; changeId "*" gives the allocated areas of <disk>-flat.vmdk (SEEK_DATA/SEEK_HOLE); any other
//     changeId is refused with a FileFault, as vSphere refuses a changeId it no longer knows.
//
// Closer to vCenter than stock vcsim, and also ours: datastore downloads (/folder) need a logged-in session's
// cookie (HTTP 401 otherwise, as vCenter answers), and GET /vbfs/stats tells how many bytes they served, so tests
// can count what a backup read.
//
// For failure tests: with -username/-password only those credentials log in (otherwise any do, as in vcsim);
// while a file <datastore>/vbfs-fail-after holds a number N, datastore downloads after the next N are answered
// with HTTP 500; while <datastore>/vbfs-quiesce-fails exists, a quiesced CreateSnapshot_Task fails with
// ApplicationQuiesceFault, as it does when VMware Tools cannot quiesce the guest; POST /vbfs/needs-consolidation
// ?vm=<moref> sets the VM's runtime.consolidationNeeded, and ConsolidateVMDisks_Task (which govmomi 0.24 lacks)
// clears it.
//
// On start it prints one JSON line {"url": ..., "datastore": ...} and serves until SIGINT or SIGTERM.
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"encoding/xml"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

var changeCounter int64

type queryChangedDiskAreas struct {
	This        string `xml:"Body>QueryChangedDiskAreas>_this"`
	Snapshot    string `xml:"Body>QueryChangedDiskAreas>snapshot"`
	DeviceKey   int32  `xml:"Body>QueryChangedDiskAreas>deviceKey"`
	StartOffset int64  `xml:"Body>QueryChangedDiskAreas>startOffset"`
	ChangeID    string `xml:"Body>QueryChangedDiskAreas>changeId"`
}

type consolidate struct {
	This string `xml:"Body>ConsolidateVMDisks_Task>_this"`
}

// setConsolidationNeeded sets runtime.consolidationNeeded of a VM through the simulator's registry.
func setConsolidationNeeded(vmValue string, needed bool) bool {
	vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: vmValue}).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	simulator.Map.WithLock(vm, func() { vm.Runtime.ConsolidationNeeded = types.NewBool(needed) })
	return true
}

// answerConsolidate runs ConsolidateVMDisks_Task as a task that clears runtime.consolidationNeeded.
func answerConsolidate(w http.ResponseWriter, body []byte) {
	var req consolidate
	_ = xml.Unmarshal(body, &req)
	vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: req.This}).(*simulator.VirtualMachine)
	if !ok {
		fault(w, "no such VM "+req.This, req.This)
		return
	}
	task := simulator.CreateTask(vm, "consolidateVMDisks", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		setConsolidationNeeded(req.This, false)
		return nil, nil
	})
	ref := task.Run()
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	fmt.Fprintf(w, envelope, fmt.Sprintf(`<ConsolidateVMDisks_TaskResponse xmlns="urn:vim25">`+
		`<returnval type="Task">%s</returnval></ConsolidateVMDisks_TaskResponse>`, ref.Value))
}

type createSnapshot struct {
	This    string `xml:"Body>CreateSnapshot_Task>_this"`
	Quiesce bool   `xml:"Body>CreateSnapshot_Task>quiesce"`
}

const envelope = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
	`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">` +
	`<soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`

func fault(w http.ResponseWriter, msg string, file string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	body := fmt.Sprintf(`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
		`<detail><FileFaultFault xmlns="urn:vim25" xsi:type="FileFault"><file>%s</file></FileFaultFault></detail>`+
		`</soapenv:Fault>`, xmlEscape(msg), xmlEscape(file))
	fmt.Fprintf(w, envelope, body)
}

// notAuthenticated is the fault vSphere answers to a call without a live session.
func notAuthenticated(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, envelope, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring></faultstring>`+
		`<detail><NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated">`+
		`<object type="Folder">group-d1</object><privilegeId>System.View</privilegeId>`+
		`</NotAuthenticatedFault></detail></soapenv:Fault>`)
}

func xmlEscape(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

// diskOf finds the virtual disk with deviceKey in the snapshot's (or the VM's) hardware.
func diskOf(devices []types.BaseVirtualDevice, key int32) *types.VirtualDisk {
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok && disk.Key == key {
			return disk
		}
	}
	return nil
}

// localPath maps "[LocalDS_0] vm/disk1.vmdk" to the datastore folder on this machine.
func localPath(datastoreDir, fileName string) string {
	rel := fileName
	if i := strings.Index(fileName, "] "); i >= 0 {
		rel = fileName[i+2:]
	}
	return filepath.Join(datastoreDir, rel)
}

func allocated(path string, size int64) ([][2]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, err
	}
	defer f.Close()
	var out [][2]int64
	var pos int64
	const seekData, seekHole = 3, 4
	for pos < size {
		start, err := f.Seek(pos, seekData)
		if err != nil {
			break // ENXIO: no data after pos
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return nil, err
		}
		if end > size {
			end = size
		}
		out = append(out, [2]int64{start, end - start})
		pos = end
	}
	return out, nil
}

func answerQuery(w http.ResponseWriter, body []byte, datastoreDir string) {
	var q queryChangedDiskAreas
	if err := xml.Unmarshal(body, &q); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	snapRef := types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: q.Snapshot}
	obj := simulator.Map.Get(snapRef)
	snap, ok := obj.(*simulator.VirtualMachineSnapshot)
	if !ok {
		fault(w, "no such snapshot "+q.Snapshot, q.Snapshot)
		return
	}
	disk := diskOf(snap.Config.Hardware.Device, q.DeviceKey)
	if disk == nil {
		fault(w, fmt.Sprintf("no disk %d", q.DeviceKey), q.Snapshot)
		return
	}
	backing, _ := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	if backing == nil {
		fault(w, "disk has no flat backing", q.Snapshot)
		return
	}
	descriptor := localPath(datastoreDir, backing.FileName)
	flat := strings.TrimSuffix(descriptor, ".vmdk") + "-flat.vmdk"
	size := disk.CapacityInBytes
	if size == 0 {
		size = disk.CapacityInKB * 1024
	}
	var areas [][2]int64
	if q.ChangeID == "*" {
		var err error
		if areas, err = allocated(flat, size); err != nil {
			fault(w, err.Error(), flat)
			return
		}
	} else {
		known := map[string][][2]int64{}
		if data, err := os.ReadFile(strings.TrimSuffix(descriptor, ".vmdk") + "-changes.json"); err == nil {
			if err := json.Unmarshal(data, &known); err != nil {
				fault(w, "bad changes file: "+err.Error(), descriptor)
				return
			}
		}
		var found bool
		if areas, found = known[q.ChangeID]; !found {
			fault(w, "Error caused by file "+backing.FileName+": changeId "+q.ChangeID+" is not known", backing.FileName)
			return
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset>`+
		`<length>%d</length>`, q.StartOffset, size-q.StartOffset)
	for _, a := range areas {
		if a[0]+a[1] <= q.StartOffset {
			continue
		}
		fmt.Fprintf(&b, `<changedArea><start>%d</start><length>%d</length></changedArea>`, a[0], a[1])
	}
	b.WriteString(`</returnval></QueryChangedDiskAreasResponse>`)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	fmt.Fprintf(w, envelope, b.String())
}

// giveSnapshotChangeIDs copies the VM's disks into its newest snapshot and gives each a changeId of its own.
func giveSnapshotChangeIDs(vmValue string) {
	vmRef := types.ManagedObjectReference{Type: "VirtualMachine", Value: vmValue}
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok || vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil {
		return
	}
	snap, ok := simulator.Map.Get(*vm.Snapshot.CurrentSnapshot).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	simulator.Map.WithLock(snap, func() {
		hw := snap.Config.Hardware
		devices := make([]types.BaseVirtualDevice, len(hw.Device))
		for i, d := range hw.Device {
			devices[i] = d
			disk, isDisk := d.(*types.VirtualDisk)
			if !isDisk {
				continue
			}
			backing, isFlat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !isFlat {
				continue
			}
			diskCopy := *disk
			backingCopy := *backing
			backingCopy.ChangeId = fmt.Sprintf("52 %s/%d", vmValue, atomic.AddInt64(&changeCounter, 1))
			diskCopy.Backing = &backingCopy
			devices[i] = &diskCopy
		}
		hw.Device = devices
		snap.Config.Hardware = hw
	})
}

type handler struct {
	inner        http.Handler
	datastoreDir string
	downloads    int64 // downloads counted against vbfs-fail-after
	served       int64 // bytes served by datastore downloads
	servedCount  int64 // datastore downloads answered
}

// countingWriter counts the body bytes of a datastore download.
type countingWriter struct {
	http.ResponseWriter
	n *int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	atomic.AddInt64(c.n, int64(n))
	return n, err
}

// loggedIn says whether the request's session cookie belongs to a live session, by asking the simulator itself
// for the current time with that cookie (it answers NotAuthenticated for an unknown or expired session).
func (h *handler) loggedIn(r *http.Request) bool {
	cookie, err := r.Cookie("vmware_soap_session")
	if err != nil {
		return false
	}
	body := fmt.Sprintf(envelope, `<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">`+
		`ServiceInstance</_this></CurrentTime>`)
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(body))
	req.Header.Set("Content-Type", "text/xml")
	req.AddCookie(cookie)
	rec := httptest.NewRecorder()
	h.inner.ServeHTTP(rec, req)
	return rec.Code == http.StatusOK && !strings.Contains(rec.Body.String(), "NotAuthenticated")
}

// failQuiesce answers a quiesced CreateSnapshot_Task with a task that fails as VMware Tools' quiescing does.
func failQuiesce(w http.ResponseWriter, vmValue string) bool {
	vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: vmValue}).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	task := simulator.CreateTask(vm, "createSnapshot", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.ApplicationQuiesceFault{}
	})
	ref := task.Run()
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	fmt.Fprintf(w, envelope, fmt.Sprintf(`<CreateSnapshot_TaskResponse xmlns="urn:vim25">`+
		`<returnval type="Task">%s</returnval></CreateSnapshot_TaskResponse>`, ref.Value))
	return true
}

// failDownload says whether this datastore download must fail (see vbfs-fail-after).
func (h *handler) failDownload() bool {
	data, err := os.ReadFile(filepath.Join(h.datastoreDir, "vbfs-fail-after"))
	if err != nil {
		atomic.StoreInt64(&h.downloads, 0)
		return false
	}
	var limit int64
	if _, err := fmt.Sscan(string(data), &limit); err != nil {
		return true
	}
	return atomic.AddInt64(&h.downloads, 1) > limit
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && r.URL.Path == "/vbfs/stats" {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]int64{
			"downloaded_bytes": atomic.LoadInt64(&h.served), "downloads": atomic.LoadInt64(&h.servedCount),
		})
		return
	}
	if r.Method == http.MethodPost && r.URL.Path == "/vbfs/needs-consolidation" {
		if !setConsolidationNeeded(r.URL.Query().Get("vm"), true) {
			http.Error(w, "no such VM", http.StatusNotFound)
		}
		return
	}
	if r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/folder/") {
		if !h.loggedIn(r) {
			http.Error(w, "not logged in", http.StatusUnauthorized)
			return
		}
		if h.failDownload() {
			http.Error(w, "injected datastore failure", http.StatusInternalServerError)
			return
		}
		atomic.AddInt64(&h.servedCount, 1)
		h.inner.ServeHTTP(countingWriter{w, &h.served}, r)
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != "/sdk" {
		h.inner.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	switch {
	case bytes.Contains(body, []byte("<QueryChangedDiskAreas")):
		if !h.loggedIn(r) {
			notAuthenticated(w)
			return
		}
		answerQuery(w, body, h.datastoreDir)
	case bytes.Contains(body, []byte("<ConsolidateVMDisks_Task")):
		if !h.loggedIn(r) {
			notAuthenticated(w)
			return
		}
		answerConsolidate(w, body)
	case bytes.Contains(body, []byte("<CreateSnapshot_Task")):
		var req createSnapshot
		_ = xml.Unmarshal(body, &req)
		if _, err := os.Stat(filepath.Join(h.datastoreDir, "vbfs-quiesce-fails")); err == nil && req.Quiesce {
			if failQuiesce(w, req.This) {
				return
			}
		}
		rec := httptest.NewRecorder()
		h.inner.ServeHTTP(rec, r)
		giveSnapshotChangeIDs(req.This)
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	default:
		h.inner.ServeHTTP(w, r)
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (loopback only)")
	plain := flag.Bool("http", false, "serve plain HTTP instead of HTTPS")
	username := flag.String("username", "", "the only user that may log in (default: any)")
	password := flag.String("password", "", "that user's password")
	flag.Parse()

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	if !*plain {
		model.Service.TLS = new(tls.Config)
	}
	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	server := model.Service.NewServer()
	ds := simulator.Map.Any("Datastore").(*simulator.Datastore)
	dsURL := ds.Info.GetDatastoreInfo().Url
	server.Config.Handler = &handler{inner: server.Config.Handler, datastoreDir: dsURL}

	u := *server.URL
	u.User = nil
	_ = json.NewEncoder(os.Stdout).Encode(map[string]string{"url": u.String(), "datastore": dsURL})

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	server.Close()
	model.Remove()
}
