// echo: a TCP and UDP echo server on Go's standard library net, the peer a Go engineer would
// write: one goroutine per connection (the runtime's netpoller is epoll underneath), and for
// --udp one goroutine reading datagrams with ReadFromUDP and writing each back with WriteToUDP.
//
// Built with echoloop.go (its accept and copy loops, shared with echo_tls.go).
//
// Usage: echo --port 0 [--backlog 511] [--udp]
// Prints {"event": "listening", "address": "127.0.0.1:PORT"} ("udp:127.0.0.1:PORT") once bound.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
)

func main() {
	port := flag.Int("port", 0, "port on 127.0.0.1 (0: any)")
	flag.Int("backlog", 511, "ignored: Go listens with net.core.somaxconn")
	udp := flag.Bool("udp", false, "echo UDP datagrams instead of TCP streams")
	flag.Parse()
	address := fmt.Sprintf("127.0.0.1:%d", *port)
	if *udp {
		serveUDP(address)
		return
	}
	ln, err := net.Listen("tcp", address)
	if err != nil {
		log.Fatal(err)
	}
	announce(ln.Addr().String())
	serve(ln) // echoloop.go
}

// serveUDP sends each datagram back to its source; a full send buffer returns an error
// that is dropped with the datagram (the echo is best effort, like the other servers').
func serveUDP(address string) {
	addr, err := net.ResolveUDPAddr("udp", address)
	if err != nil {
		log.Fatal(err)
	}
	conn, err := net.ListenUDP("udp", addr)
	if err != nil {
		log.Fatal(err)
	}
	announce("udp:" + conn.LocalAddr().String())
	buf := make([]byte, 65536)
	for {
		n, peer, err := conn.ReadFromUDP(buf)
		if err != nil {
			continue
		}
		conn.WriteToUDP(buf[:n], peer)
	}
}
