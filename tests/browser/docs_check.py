"""Drives headless Chromium through /docs over the DevTools protocol (on a pipe: the standard
library only) and checks what a user sees:

1. the rendered page lists every operation of /openapi.json (method, path and operationId);
2. "Try it out" -> "Execute" on GET /health answers 200 in the page, and, after "Authorize" with
   the bearer token, on GET /recommendations/{user_id} too;
3. every request the page made went to the server itself (Chromium runs with a dead proxy for
   everything but loopback, and each request URL is recorded).

Usage: python3 docs_check.py BASE_URL TOKEN USER_ID   (exit status 0 when all checks pass)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

BASE, TOKEN, USER = sys.argv[1], sys.argv[2], sys.argv[3]


class Browser:
    """Chromium with --remote-debugging-pipe: CDP messages are JSON, each ended by a NUL byte, on
    fd 3 (to the browser) and fd 4 (from it)."""

    def __init__(self, chromium):
        self.profile = tempfile.mkdtemp(prefix="docs-check-")
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        # the child gets the pipes as fds 3 and 4 (subprocess closes the others after preexec_fn)
        def fds():
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}",
             # no network but this server: everything but loopback (which Chromium never proxies) goes
             # to a proxy that does not exist
             "--proxy-server=127.0.0.1:9",
             "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4),  # kept open after preexec_fn
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.buf = b""
        self.next_id = 0
        self.events = []

    def _read(self):
        while b"\0" not in self.buf:
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def main():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    spec = json.load(urllib.request.urlopen(f"{BASE}/openapi.json"))
    operations = [(m.upper(), path, op.get("operationId", ""))
                  for path, item in spec["paths"].items() for m, op in item.items()
                  if m in ("get", "post", "put", "delete", "patch")]
    b = Browser(chromium)
    failures = []
    try:
        target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        b.call("Network.enable", {}, session)
        b.call("Page.enable", {}, session)

        def js(expr):
            r = b.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                       session)
            if "exceptionDetails" in r:
                raise RuntimeError(f"{expr[:80]}...: {r['exceptionDetails']}")
            return r["result"].get("value")

        def wait(expr, what, limit=20):
            deadline = time.time() + limit
            while time.time() < deadline:
                v = js(expr)
                if v:
                    return v
                time.sleep(0.1)
            raise RuntimeError(f"timed out waiting for {what}")

        b.call("Page.navigate", {"url": f"{BASE}/docs"}, session)
        wait(f"document.querySelectorAll('.opblock').length >= {len(operations)}", "the operations to render")
        rendered = js("""[...document.querySelectorAll('.opblock')].map(e => [
            e.querySelector('.opblock-summary-method').textContent.trim(),
            e.querySelector('.opblock-summary-path').getAttribute('data-path'),
            (e.querySelector('.opblock-summary-operation-id') || {textContent: ''}).textContent.trim()])""")
        title = js("(document.querySelector('.info .title') || {textContent: ''}).textContent.trim()")
        print(f"rendered /docs: {title!r}, {len(rendered)} operations")
        for method, path, op_id in operations:
            ok = [method, path, op_id] in rendered
            print(f"  {'ok ' if ok else 'MISSING'} {method:6} {path:30} {op_id}")
            if not ok:
                failures.append(f"operation {method} {path} ({op_id}) not rendered")

        def try_it_out(method, path, fill=None):
            """Expands the operation, clicks "Try it out", fills path parameters, clicks
            "Execute" and returns the status code the page shows."""
            block = (f"[...document.querySelectorAll('.opblock')].find(e => "
                     f"e.querySelector('.opblock-summary-path').getAttribute('data-path') === {json.dumps(path)} && "
                     f"e.querySelector('.opblock-summary-method').textContent.trim() === {json.dumps(method)})")
            js(f"{block}.querySelector('.opblock-summary-control').click()")
            wait(f"!!{block}.querySelector('.try-out__btn')", f"'Try it out' of {method} {path}")
            js(f"{block}.querySelector('.try-out__btn').click()")
            wait(f"!!{block}.querySelector('.execute')", f"'Execute' of {method} {path}")
            for name, value in (fill or {}).items():
                # React inputs: set through the native setter, then announce the input
                js(f"""(() => {{ const i = {block}.querySelector('tr[data-param-name={json.dumps(name)}] input');
                    Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, {json.dumps(value)});
                    i.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()""")
            if fill:
                time.sleep(1)  # Swagger UI debounces its inputs
            js(f"{block}.querySelector('.execute').click()")
            try:
                return wait(f"(() => {{ const s = {block}.querySelector("
                            f"'.live-responses-table tbody .response-col_status');"
                            f" return s && s.textContent.trim(); }})()", f"the response of {method} {path}")
            except RuntimeError:
                print(js(f"{block}.innerText")[:2000])
                raise

        status = try_it_out("GET", "/health")
        print(f"Try it out: GET /health -> {status}")
        if not status.startswith("200"):
            failures.append(f"GET /health from the page answered {status}")
        # "Authorize" (the bearer scheme of /openapi.json), as a user would fill the dialog
        js(f"""window.ui.authActions.authorize({{bearer: {{name: 'bearer',
              schema: {{type: 'http', scheme: 'bearer'}}, value: {json.dumps(TOKEN)}}}}}), true""")
        status = try_it_out("GET", "/recommendations/{user_id}", {"user_id": USER})
        print(f"Try it out (authorized): GET /recommendations/{{user_id}} with user_id={USER} -> {status}")
        if not status.startswith("200"):
            failures.append(f"GET /recommendations/{USER} from the page answered {status}")

        urls = sorted({e["params"]["request"]["url"] for e in b.events
                       if e.get("method") == "Network.requestWillBeSent"})
        outside = [u for u in urls if not (u.startswith(BASE + "/") or u.startswith("data:"))]
        print(f"requests made by the page: {len(urls)} distinct URLs, all on {BASE}: {not outside}")
        for u in urls:
            print(f"  {u[:100]}")
        failed = [e["params"].get("errorText") for e in b.events if e.get("method") == "Network.loadingFailed"]
        if outside:
            failures.append(f"requests beyond the server: {outside}")
        if failed:
            failures.append(f"failed loads: {failed}")
    finally:
        b.close()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("docs browser check: ok")


main()
