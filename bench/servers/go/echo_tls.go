// echo_tls: a TLS echo server on Go's crypto/tls, one goroutine per connection, the
// standard library only: the compiled baseline of the TLS workloads (bench/run --only tls).
//
// Built with echoloop.go (its accept and copy loops, shared with echo.go).
//
// Usage: echo_tls --port 0 --cert CERT.pem --key KEY.pem
// Prints {"event": "listening", "address": "127.0.0.1:PORT"} once bound.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
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
	announce(ln.Addr().String())
	serve(ln) // echoloop.go
}
