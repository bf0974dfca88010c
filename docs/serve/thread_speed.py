"""The same plain decode (64 tokens, default model) on the main thread and on a worker thread:
why `redrafter serve` runs its decode loop on the main thread. python docs/serve/thread_speed.py"""

import threading
import time

from redrafter import ReDrafter

rd = ReDrafter.from_pretrained("default", drafter="none")
ids = rd.encode("Tell me about Paris.")


def run(label):
    t = time.perf_counter()
    rd.generate_ids([ids], 64)
    dt = time.perf_counter() - t
    print(label, f"{64 / dt:.1f} tok/s", flush=True)


run("main warm")
run("main")


def thrice():
    for k in range(3):
        run(f"thread {k}")


th = threading.Thread(target=thrice)
th.start()
th.join()
run("main again")
