"""Detection from the weights: what a checkpoint or artifact says about itself (``fingerprint``)
and where a numeric divergence points (``diagnose``). Artifact formats are read by readers that
backends contribute; nothing here names a backend."""
