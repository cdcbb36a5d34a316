"""The Ray shells around the core: the router actor, each replica's link to it, the node probes,
the GPU/NVML seam and the router's metrics. Every Ray, NVML and CUDA call lives here or in the
deployments, so the decisions in `serve_app.core` stay pure."""
