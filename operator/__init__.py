"""The kubeinfer operator: reconciles InferenceModel resources into engine pods."""
