"""Console scripts, one module each (``gptjax-train``, ``gptjax-sample``, ``gptjax-plan``, ``gptjax-plot``,
``gptjax-scaling``, ``gptjax-export``, ``gptjax-import``); each builds its parser in ``parser()``, with which the
docs test parses every command shown in README.md and docs/. The top layer."""
