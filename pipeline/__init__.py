"""twostream library: pure building blocks (video, flow, backbones, store, datasets, heads, training, metrics).

Importable without the CLI. Math modules (flow, heads, prox, kernels, metrics) do no file or video I/O.
"""

__version__ = "0.1.0"
