"""Imported by the fork server in tests/unit/test_forkserver.py: starts a thread, which the
server must refuse (a fork copies only the forking thread)."""

import threading
import time

threading.Thread(target=time.sleep, args=(30,), daemon=True, name="started-on-import").start()
