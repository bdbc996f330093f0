"""Protocol codecs and their routes: KServe v2, OpenAI, SageMaker."""
