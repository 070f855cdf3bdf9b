"""The ``vllm`` backend of the sampler and scorer interfaces (rollout workers, teachers).

Each actor runs one vLLM engine in-process (``LLM``; on CPU with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``) under a Ray ``runtime_env`` whose ``py_executable`` is
vLLM's own virtualenv (``make install-vllm`` builds ``.venv-vllm``): vLLM pins other torch /
transformers versions than raykd's learners. Nothing here imports vLLM at module level, so
the driver (raykd's venv) can name these classes without vLLM installed.

* :mod:`.engine` — engine settings (``rollout.vllm`` / ``teacher.vllm``), the actors'
  ``runtime_env``, building the ``LLM``.
* :mod:`.sampler` — :class:`~raykd.roles.vllm.sampler.VLLMRolloutWorker` (``rollout.backend:
  vllm``): sampled / greedy continuations with temperature-1 log-probs; weight updates.
* :mod:`.scorer` — :class:`~raykd.roles.vllm.scorer.VLLMTeacherScorer` (``teacher.backend:
  vllm``): token and top-k log-probs from prefill-only requests (``prompt_logprobs``).
* :mod:`.extension` — the worker extension (``worker_extension_cls``) that loads new weights
  into the running engine, from the object store, a torch process group or CUDA IPC.
"""
