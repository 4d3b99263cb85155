"""mwn: Meta-Weight-Net sample reweighting with exact meta-gradients, in pure torch.func.

Layers, each importing only what it stands on: mwn.core (one iteration as pure functions of
explicit state), mwn.data (files to device-resident seeded batches), mwn.run (one run or a
vectorised group and its folder), mwn.report (reading run folders back). Entry points:
python -m mwn.train | report | compare | bench.
"""
