"""A rank program for tests/unit/test_forkserver.py: prints what it sees of its process, then
ends as ``sys.argv[1]`` says (ok, exit3, raise, thread, sleep)."""

import atexit
import json
import os
import sys
import threading
import time


def main() -> None:
    mode = sys.argv[1]
    seen = {
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "var": os.environ.get("FORK_TEST_VAR"),
        "leads_its_session": os.getsid(0) == os.getpid(),
        "main": __name__ == "__main__" and sys.modules["__main__"].__dict__ is globals(),
        "preloaded": "xml.dom.minidom" in sys.modules,
        "stdin": sys.stdin.read(),
    }
    print(json.dumps(seen))
    print("to stderr", file=sys.stderr)
    atexit.register(lambda: print("atexit ran"))
    if mode == "thread":
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread done"))).start()
    elif mode == "exit3":
        sys.exit(3)
    elif mode == "raise":
        raise RuntimeError("boom")
    elif mode == "sleep":
        time.sleep(120)


if __name__ == "__main__":
    main()
