"""Deep Compression: k-means weight sharing, centroid fine-tuning, Huffman-coded files; adaptive bits.

    >>> from brainsurgeon.share import WeightSharing, share_, save_encoded, load_encoded
    >>> rep = share_(model, WeightSharing(bits=4), data=train_loader)
    >>> f = save_encoded(model, "out/model.bsdc"); f.bytes_on_disk, f.ratio
    >>> model.load_state_dict(load_encoded("out/model.bsdc"))
"""

from .api import plan_sharing, share_
from .bits import adaptive_bits, allocate_bits, gradient_sensitivity, hessian_sensitivity, predicted_costs
from .codec import EncodedFile, decode_state, encode_state, load_encoded, save_encoded
from .config import WeightSharing
from .finetune import finetune_centroids, sharing_hooks
from .kmeans import Codebook, cluster_weight, kmeans_1d

__all__ = [
    "Codebook", "EncodedFile", "WeightSharing", "adaptive_bits", "allocate_bits", "cluster_weight",
    "decode_state", "encode_state", "finetune_centroids", "gradient_sensitivity", "hessian_sensitivity",
    "kmeans_1d", "load_encoded", "plan_sharing", "predicted_costs", "save_encoded", "share_", "sharing_hooks",
]
