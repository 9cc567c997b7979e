"""What a distributed run is, whatever it computes: the process group and its exchanges (`distributed`), the output
lock, stop signals and non-finite guard (`guard`), atomic checkpoints and resume paths (`checkpoint`) and the run's
logs (`runlog`). CLIP training, the classification mode and the labelling pass build on it; it imports none of them.
"""
