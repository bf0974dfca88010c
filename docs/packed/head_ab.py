"""exact_argmax over n rows: the head's product packed (PackedForward.head) or the model's own (micro)."""
import time, torch
from redrafter.api import ReDrafter
torch.set_num_threads(2)
from redrafter.sampling import exact_argmax
rd = ReDrafter.from_pretrained("default")
t, packed = rd.target, rd.decoder.head
print(type(packed).__name__)
def bench(f, n=40):
    for _ in range(5): f()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return 1000 * sorted(ts)[n // 2]
with torch.inference_mode():
    for rows in (8, 16, 24):
        h = torch.randn(1, rows, 576, dtype=torch.bfloat16)
        a = bench(lambda: exact_argmax(t, h, argmax_head=rd.argmax_head))
        b = bench(lambda: exact_argmax(t, h, argmax_head=rd.argmax_head, head=packed))
        same = torch.equal(exact_argmax(t, h, head=packed), exact_argmax(t, h))
        print(f"{rows} rows: model's head {a:.2f} ms, packed {b:.2f} ms, same tokens {same}")
