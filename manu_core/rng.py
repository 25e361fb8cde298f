"""Torch's global random generator is one per process, shared by every thread, and the flow runs
model tasks in threads (device slots, tasks/devices.py).

Training draws from it: `torch.manual_seed`, then the initial weights, LoRA's initialisation and
every dropout mask. A baseline that seeds it while a never-learned reference trains in another thread
changes the reference's dropout masks from that step on, so the same preset trained inside a sweep
and alone came out with different bytes (docs/embedded.md, "Trainings take turns"). Every training
entry point (`presets.train_vanilla`, `baselines.unlearn_gradient`, `relearn.relearn`) holds
`GLOBAL_RNG` from its seed to its last step: trainings in one process take turns, and each gives the
bytes it gives alone. Evaluation and extraction draw nothing and never wait for it. Trainings in
separate processes (a fanned-out sweep's parts, flows/fanout.py) still run at once.
"""

import threading

GLOBAL_RNG = threading.RLock()  # reentrant: a training may start another (a planted preset's reference)
