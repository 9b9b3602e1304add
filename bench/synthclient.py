"""The least a Python client does to plan a fleet (S2's reference column): GET each ref's
manifest by tag, parse it, GET each unique config once; 16 threads, one `requests`
session a thread, no verification, no cache. Prints the number of documents fetched.

    python3 -m bench.synthclient REFS_FILE
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

ACCEPT = "application/vnd.oci.image.manifest.v1+json"


def main(path: str, threads: int = 16) -> int:
    refs = [x.strip() for x in open(path) if x.strip()]
    local = threading.local()
    lock = threading.Lock()
    configs: set[str] = set()

    def session() -> requests.Session:
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
        return s

    def one(ref: str) -> int:
        host, _, rest = ref.partition("/")
        repo, _, tag = rest.rpartition(":")
        r = session().get(f"http://{host}/v2/{repo}/manifests/{tag}",
                          headers={"Accept": ACCEPT}, timeout=60)  # fmt: skip
        r.raise_for_status()
        digest = json.loads(r.content)["config"]["digest"]
        with lock:
            if digest in configs:
                return 1
            configs.add(digest)
        session().get(f"http://{host}/v2/{repo}/blobs/{digest}", timeout=60).raise_for_status()
        return 2

    with ThreadPoolExecutor(threads) as pool:
        print(sum(pool.map(one, refs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
