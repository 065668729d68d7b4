// echoloop: what the Go echo servers share (echo.go, echo_tls.go): announcing the address,
// the accept loop and the copy loop, one goroutine per connection. The bench builds each
// server together with this file (bootstrap.GO_PROGRAMS), the standard library only.
package main

import (
	"fmt"
	"log"
	"net"
	"os"
	"time"
)

// announce prints the line the bench waits for once the server is bound.
func announce(address string) {
	fmt.Printf("{\"event\": \"listening\", \"address\": \"%s\"}\n", address)
	os.Stdout.Sync()
}

// serve accepts for ever, each connection echoed by a goroutine of its own.
func serve(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil { // EMFILE and the like: wait a little, as net/http does
			log.Print(err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go echo(conn)
	}
}

// echo writes back what it reads until EOF or an error (over TLS, the handshake runs on
// the first Read). The 16 KiB buffer is what io.Copy would use at most (32 KiB) halved: a
// goroutine's buffer is its idle cost too.
func echo(conn net.Conn) {
	defer conn.Close()
	buf := make([]byte, 16*1024)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if _, werr := conn.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
