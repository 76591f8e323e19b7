"""A local HTTP endpoint for the retry example: 503 for the first two requests of each
path, then 200 with a JSON body. Usage: python3 flaky_server.py PORT"""
import json
import sys
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen = Counter()


class Flaky(BaseHTTPRequestHandler):
    def do_GET(self):
        seen[self.path] += 1
        if seen[self.path] <= 2:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"try again")
            return
        body = json.dumps({"quote": "Simplicity is prerequisite for reliability.", "attempt": seen[self.path]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("flaky_server: " + (fmt % args) + "\n")


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Flaky).serve_forever()
