"""Scale-out: the same models, runners and traffic policies on engines that already run at scale
(Ray Serve deployments), and the files other platforms read (KServe InferenceService manifests,
Triton model repositories). One machine stays the default; nothing here is needed to serve."""
