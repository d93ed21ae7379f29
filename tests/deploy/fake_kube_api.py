"""A stand-in Kubernetes API server on a free loopback port, for the parts of Helm's Go SDK that
talk to a cluster: the version check of `kubeVersion` (install) and `lookup` (templates reading
existing objects). It answers discovery (/version, /api, /apis, /api/v1) and GET of the Secrets
it is given, 404 for anything else, and records every request. No cluster runs here; this is
as far as the SDK can be driven without one.
"""
from __future__ import annotations

import http.server
import json
import threading


class FakeKubeAPI:
    def __init__(self, version: str = "1.37.0", secrets: dict[tuple[str, str], dict] | None = None):
        self.version, self.secrets, self.requests = version, dict(secrets or {}), []

    def _answer(self, path: str):
        major, minor = self.version.split(".")[:2]
        if path == "/version":
            return {"major": major, "minor": minor, "gitVersion": f"v{self.version}"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
                 "verbs": ["get", "list"]}]}
        parts = path.strip("/").split("/")
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
            found = self.secrets.get((parts[3], parts[5]))
            if found is not None:
                return {"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": parts[5], "namespace": parts[3]}, **found}
        return None

    def __enter__(self) -> FakeKubeAPI:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?")[0]
                api.requests.append(path)
                body = api._answer(path)
                code = 200 if body is not None else 404
                if body is None:
                    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                            "code": 404}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, namespace: str = "ml") -> str:
        port = self.server.server_address[1]
        return (f"apiVersion: v1\nkind: Config\n"
                f"clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
                f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]\n"
                f"current-context: fake\nusers: [{{name: fake, user: {{token: not-a-token}}}}]\n")
