// tlsload: the TLS load generator (crypto/tls), with bench/loadgen.c's options and JSON keys.
//
// Go, not C: a TLS client is most of OpenSSL's state machine around every socket, and Go's
// crypto/tls is compiled with assembly AES-GCM and P-256, so on its own core it stays ahead
// of the servers measured (its CPU share is in the result as client_cpu_s). Each connection
// is a goroutine; pinned to one CPU, GOMAXPROCS is 1.
//
// Modes:
//
//	pingpong  --conns N connections send SIZE bytes, wait for the whole echo, repeat
//	connect   --conns N workers each loop: connect, full handshake (no resumption),
//	          SIZE bytes echoed, close_notify and close; a "round trip" is one connection
//
// --idle N opens N more connections that complete the handshake and echo one probe byte,
// then stay open and idle; --conns 0 --idle N --hold-stdin is a holder process beside a
// measured client (as loadgen's). Every echoed byte is compared with the deterministic
// stream sent (the same pattern as loadgen's). Every phase is bounded in time; the measure
// phase also by --max-round-trips. With --server-pid, the server's CPU (utime+stime plus
// cutime+cstime: forking servers' reaped children count) is read at the start and end of
// the measured interval; --watch-cpu N watches how busy CPU N was.
//
// Build: go build -o tlsload tlsload.go (bench/run does it with Debian's golang-go).
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const (
	patLen     = 1000003 // prime: pattern period in bytes
	maxIO      = 256 * 1024
	maxSamples = 2_000_000 // latency samples kept in all
	dialers    = 64        // handshakes in flight at once while opening connections
)

var versions = map[uint16]string{tls.VersionTLS12: "TLS 1.2", tls.VersionTLS13: "TLS 1.3"}

var (
	pat       []byte
	measuring atomic.Bool // round trips count only while set
	stopping  atomic.Bool // workers stop at their next round trip
	samples   atomic.Int64
	errCounts sync.Map // kind -> *atomic.Int64
	tlsInfo   atomic.Value
)

type opts struct {
	host, mode                            string
	port, conns, idle, size               int
	warmup, duration, connectTO, stallTO  float64
	serverPID, watchCPU, sourceAddrs, off int
	holdStdin                             bool
	maxRT                                 int64
}

// monoS is CLOCK_MONOTONIC in seconds, comparable with loadgen's *_mono_s figures.
func monoS() float64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1, uintptr(unsafe.Pointer(&ts)), 0)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

func countErr(kind string) {
	v, _ := errCounts.LoadOrStore(kind, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func errKind(err error) string {
	s := err.Error()
	switch {
	case strings.Contains(s, "reset"):
		return "reset"
	case strings.Contains(s, "EOF"):
		return "eof"
	case strings.Contains(s, "timeout"):
		return "stalled"
	case strings.Contains(s, "tls:"), strings.Contains(s, "x509"):
		return "handshake"
	}
	return "other"
}

// expect is the stream connection base must carry at offset off.
func expect(base, off uint64, n int) []byte {
	i := (base + off) % patLen
	return pat[i : i+uint64(n)]
}

type client struct {
	o      *opts
	cfg    *tls.Config
	addr   string
	serial atomic.Uint64 // source addresses are spread by connection number
}

func (c *client) dial() (*tls.Conn, error) {
	d := net.Dialer{Timeout: time.Duration(c.o.connectTO * float64(time.Second))}
	if c.o.sourceAddrs > 0 {
		i := (uint64(c.o.off) + c.serial.Add(1)) % uint64(c.o.sourceAddrs)
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i))}
	}
	raw, err := d.Dial("tcp", c.addr)
	if err != nil {
		return nil, err
	}
	raw.(*net.TCPConn).SetNoDelay(true)
	conn := tls.Client(raw, c.cfg)
	conn.SetDeadline(time.Now().Add(d.Timeout))
	if err := conn.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	if tlsInfo.Load() == nil {
		st := conn.ConnectionState()
		tlsInfo.Store([2]string{versions[st.Version], tls.CipherSuiteName(st.CipherSuite)})
	}
	return conn, nil
}

// echo sends size bytes at offset off of the connection's stream and verifies the echo.
func (c *client) echo(conn *tls.Conn, base, off uint64, size int, buf []byte) error {
	conn.SetDeadline(time.Now().Add(time.Duration(c.o.stallTO * float64(time.Second))))
	for sent := 0; sent < size; {
		n := size - sent
		if n > maxIO {
			n = maxIO
		}
		if _, err := conn.Write(expect(base, off+uint64(sent), n)); err != nil {
			return err
		}
		sent += n
	}
	for got := 0; got < size; {
		n := size - got
		if n > len(buf) {
			n = len(buf)
		}
		k, err := conn.Read(buf[:n])
		if k > 0 && !bytes.Equal(buf[:k], expect(base, off+uint64(got), k)) {
			return fmt.Errorf("mismatch")
		}
		got += k
		if err != nil && got < size {
			return err
		}
	}
	return nil
}

type tally struct {
	rt, bytes int64
	lat       []float64 // µs
}

func (t *tally) record(size int, since time.Time) {
	if !measuring.Load() {
		return
	}
	t.rt++
	t.bytes += int64(size)
	if samples.Add(1) <= maxSamples {
		t.lat = append(t.lat, float64(time.Since(since).Nanoseconds())/1e3)
	}
}

func (c *client) pingpong(conn *tls.Conn, base uint64, t *tally) {
	defer conn.Close()
	buf := make([]byte, maxIO)
	off := uint64(1) // after the probe byte
	for !stopping.Load() {
		t0 := time.Now()
		if err := c.echo(conn, base, off, c.o.size, buf); err != nil {
			if !stopping.Load() {
				countErr(errKind(err))
			}
			return
		}
		off += uint64(c.o.size)
		t.record(c.o.size, t0)
		if c.o.maxRT > 0 && measuring.Load() && t.rt >= c.o.maxRT {
			return
		}
	}
}

func (c *client) connector(base uint64, t *tally) {
	buf := make([]byte, maxIO)
	for !stopping.Load() {
		t0 := time.Now()
		conn, err := c.dial()
		if err == nil {
			err = c.echo(conn, base, 0, c.o.size, buf)
			conn.Close() // close_notify, then FIN
		}
		if err != nil {
			if !stopping.Load() {
				countErr(errKind(err))
				time.Sleep(10 * time.Millisecond)
			}
			continue
		}
		t.record(c.o.size, t0)
	}
}

// open connects n connections (at most `dialers` handshakes at once) and echoes one probe
// byte on each; failures are counted and leave a nil.
func (c *client) open(n int, deadline time.Time) ([]*tls.Conn, float64, float64) {
	conns := make([]*tls.Conn, n)
	t0 := time.Now()
	var connected atomic.Int64
	var lastConnect atomic.Int64
	sem := make(chan struct{}, dialers)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			if time.Now().After(deadline) {
				countErr("connect")
				return
			}
			conn, err := c.dial()
			if err != nil {
				countErr("connect")
				return
			}
			connected.Add(1)
			lastConnect.Store(int64(time.Since(t0)))
			buf := make([]byte, 1)
			if err := c.echo(conn, uint64(i)*7919*13, 0, 1, buf); err != nil {
				countErr("stalled")
				conn.Close()
				return
			}
			conns[i] = conn
		}(i)
	}
	wg.Wait()
	return conns, time.Duration(lastConnect.Load()).Seconds(), time.Since(t0).Seconds()
}

// cpuTicks is utime+stime+cutime+cstime of pid and the user part, in clock ticks.
func cpuTicks(pid int) (total, user int64, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	var v [4]int64
	for i := range v {
		v[i], _ = strconv.ParseInt(f[11+i], 10, 64) // utime is field 14, the 12th after ')'
	}
	return v[0] + v[1] + v[2] + v[3], v[0] + v[2], true
}

func cpuJiffies(n int) (busy, total uint64, ok bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || f[0] != fmt.Sprintf("cpu%d", n) {
			continue
		}
		var v [8]uint64
		for i := range v {
			v[i], _ = strconv.ParseUint(f[1+i], 10, 64)
			total += v[i]
		}
		return total - v[3] - v[4], total, true
	}
	return
}

func ownCPU() int {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	n, _ := strconv.Atoi(f[36]) // processor is field 39
	return n
}

func rusageS() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func pct(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)))
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

func main() {
	o := &opts{}
	flag.StringVar(&o.host, "host", "127.0.0.1", "")
	flag.IntVar(&o.port, "port", 0, "")
	flag.StringVar(&o.mode, "mode", "pingpong", "pingpong | connect")
	flag.IntVar(&o.conns, "conns", 1, "active connections (connect: workers)")
	flag.IntVar(&o.size, "size", 1024, "bytes per message")
	flag.IntVar(&o.idle, "idle", 0, "more connections that stay idle after one probe")
	flag.Float64Var(&o.warmup, "warmup", 0.5, "")
	flag.Float64Var(&o.duration, "duration", 2, "")
	flag.Int64Var(&o.maxRT, "max-round-trips", 100_000_000, "per connection or worker")
	flag.IntVar(&o.serverPID, "server-pid", 0, "")
	flag.Float64Var(&o.connectTO, "connect-timeout", 30, "")
	flag.Float64Var(&o.stallTO, "stall-timeout", 5, "")
	flag.IntVar(&o.watchCPU, "watch-cpu", -1, "")
	flag.BoolVar(&o.holdStdin, "hold-stdin", false, "")
	flag.IntVar(&o.sourceAddrs, "source-addrs", 0, "")
	flag.IntVar(&o.off, "source-offset", 0, "")
	flag.Parse()
	if o.port <= 0 || o.conns < 0 || o.idle < 0 || o.conns+o.idle < 1 || o.size < 1 ||
		(o.mode != "pingpong" && o.mode != "connect") {
		fmt.Fprintln(os.Stderr, "usage: tlsload --port P [--mode pingpong|connect] [--conns N] ...")
		os.Exit(2)
	}
	pat = make([]byte, patLen+maxIO)
	x := uint64(0x9E3779B97F4A7C15)
	for i := 0; i < patLen; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		pat[i] = byte(x >> 24)
	}
	copy(pat[patLen:], pat[:maxIO])
	c := &client{
		o:    o,
		addr: net.JoinHostPort(o.host, strconv.Itoa(o.port)),
		// Each server shows its own certificate (self-signed, made by the bench): the
		// client skips verifying the chain, not the handshake's signature. No session
		// cache: every connection is a full handshake.
		cfg: &tls.Config{InsecureSkipVerify: true, ServerName: "localhost"},
	}

	tBegin := monoS()
	deadline := time.Now().Add(time.Duration(o.connectTO * float64(time.Second)))
	opened := o.idle
	if o.mode == "pingpong" {
		opened += o.conns
	}
	conns, connectAll, probeAll := c.open(opened, deadline)
	tProbed := monoS()
	released := make(chan struct{})
	if o.holdStdin {
		fmt.Fprintln(os.Stderr, "established")
		go func() {
			io.Copy(io.Discard, bufio.NewReader(os.Stdin))
			close(released)
		}()
	}

	tallies := make([]*tally, o.conns)
	var wg sync.WaitGroup
	for i := 0; i < o.conns; i++ {
		tallies[i] = &tally{}
		base := uint64(i) * 7919 * 13
		if o.mode == "connect" {
			wg.Add(1)
			go func(i int) { defer wg.Done(); c.connector(base, tallies[i]) }(i)
		} else if conn := conns[o.idle+i]; conn != nil {
			wg.Add(1)
			go func(i int) { defer wg.Done(); c.pingpong(conn, base, tallies[i]) }(i)
		}
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	var done chan struct{} // nil: a holder (--conns 0) waits for its release or the duration
	if o.conns > 0 {
		done = finished
	}
	wait := func(s float64) {
		select {
		case <-time.After(time.Duration(s * float64(time.Second))):
		case <-released:
		case <-done:
		}
	}

	wait(o.warmup)
	own := ownCPU()
	cpu0, ucpu0, _ := cpuTicks(o.serverPID)
	wb0, wt0, _ := cpuJiffies(o.watchCPU)
	ob0, ot0, _ := cpuJiffies(own)
	ccpu0, tMeasure := rusageS(), monoS()
	measuring.Store(true)
	wait(o.duration)
	measuring.Store(false)
	cpu1, ucpu1, cpuOK := cpuTicks(o.serverPID)
	wb1, wt1, _ := cpuJiffies(o.watchCPU)
	ob1, ot1, _ := cpuJiffies(own)
	ccpu1, tEnd := rusageS(), monoS()
	stopping.Store(true)
	select { // the workers finish their round trip in flight (bounded by the stall timeout)
	case <-finished:
	case <-time.After(time.Duration((o.stallTO + 1) * float64(time.Second))):
		countErr("stalled")
	}
	for _, conn := range conns[:o.idle] {
		if conn != nil {
			conn.Close()
		}
	}

	var rt, nbytes int64
	var lat []float64
	for _, t := range tallies {
		rt += t.rt
		nbytes += t.bytes
		lat = append(lat, t.lat...)
	}
	sort.Float64s(lat)
	secs := tEnd - tMeasure
	hz := 100.0 // USER_HZ on Linux
	errors := map[string]int64{}
	var nerr int64
	errCounts.Range(func(k, v any) bool {
		errors[k.(string)] = v.(*atomic.Int64).Load()
		nerr += errors[k.(string)]
		return true
	})
	res := map[string]any{
		"mode": o.mode, "conns": o.conns, "idle": o.idle, "size": o.size,
		"duration_s": secs, "round_trips": rt, "bytes": nbytes,
		"round_trips_per_s": float64(rt) / secs, "mb_per_s": float64(nbytes) / secs / 1e6,
		"client_cpu_s": ccpu1 - ccpu0, "connect_all_s": connectAll, "probe_all_s": probeAll,
		"t_begin_mono_s": tBegin, "t_connected_mono_s": tBegin + connectAll,
		"t_probed_mono_s": tProbed, "measure_start_mono_s": tMeasure, "measure_end_mono_s": tEnd,
		"errors": errors, "error_total": nerr,
		"server_cpu_s": nil, "server_user_s": nil, "watched_cpu_busy": nil, "client_cpu_busy": nil,
	}
	if len(lat) > 0 {
		res["latency_us"] = map[string]float64{
			"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "p99_9": pct(lat, 0.999),
			"max": lat[len(lat)-1],
		}
	}
	if o.serverPID > 0 && cpuOK {
		res["server_cpu_s"] = float64(cpu1-cpu0) / hz
		res["server_user_s"] = float64(ucpu1-ucpu0) / hz
	}
	if wt1 > wt0 {
		res["watched_cpu_busy"] = float64(wb1-wb0) / float64(wt1-wt0)
	}
	if ot1 > ot0 {
		res["client_cpu_busy"] = float64(ob1-ob0) / float64(ot1-ot0)
	}
	if info, ok := tlsInfo.Load().([2]string); ok {
		res["tls_version"], res["tls_cipher"] = info[0], info[1]
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if nerr > 0 {
		os.Exit(1)
	}
}
