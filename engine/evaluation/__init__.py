"""Frozen evaluation: attentive probes on a frozen encoder (spec 6). Entry point: `python engine/eval.py`."""
