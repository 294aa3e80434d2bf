"""open_clip models (registry: specs, weights, digests) and the inference engines that run them."""
