"""compress: a staged model compression and deployment pipeline for PyTorch classifiers."""

import os

# OpenMP's default busy-waiting makes every process crawl as soon as two of them share the
# cores (measured here: a LeNet-300-100 training step went from 8 ms to 221 ms with a second
# pipeline running). Passive waiting costs next to nothing when the machine is idle. It must
# be set before torch loads its OpenMP runtime, hence here; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
