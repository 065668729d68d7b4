// echo_tls: a TLS echo server on Go's crypto/tls, one goroutine per connection, the
// standard library only: the compiled baseline of the TLS workloads (bench/run --only tls).
//
// Usage: echo_tls --port 0 --cert CERT.pem --key KEY.pem
// Prints {"event": "listening", "address": "127.0.0.1:PORT"} once bound.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"time"
)

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (0: any)")
	flag.Int("backlog", 511, "ignored: Go listens with net.core.somaxconn")
	certFile := flag.String("cert", "", "PEM certificate")
	keyFile := flag.String("key", "", "PEM private key")
	flag.Parse()
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	config := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	ln, err := tls.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port), config)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("{\"event\": \"listening\", \"address\": \"%s\"}\n", ln.Addr())
	os.Stdout.Sync()
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

// echo writes back what it reads until EOF or an error; the handshake runs on the first Read.
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
