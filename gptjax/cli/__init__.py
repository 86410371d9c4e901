"""Console scripts, one module each (``gptjax-train``, ``gptjax-sample``, ``gptjax-plan``, ``gptjax-plot``);
the top layer."""
