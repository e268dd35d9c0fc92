"""Simulated engine (vLLM, SGLang or any OpenAI server): the OpenAI HTTP API with no GPU and no model.

Run ``python -m router.sim --engine vllm|sglang|openai --model NAME --port P [knobs]
[any other engine args]`` (any engine of router.engines: it speaks the dialect
its EngineSpec names), or in-process::

    engine = SimEngine(SimOptions(engine="vllm", model="m", port=0, itl_ms=5))
    await engine.start()          # engine.url, engine.port
    ...
    await engine.stop()

``parse_options(argv)`` builds the same `SimOptions` from a command line.

Engine flags understood (both ``--f v`` and ``--f=v``): ``--host``, ``--port``,
``--model``/``--model-path``, ``--served-model-name`` (vLLM: one or more names;
SGLang: one), ``--max-model-len``/``--context-length`` (default 4096; vLLM's
``32k``, ``32K`` and ``auto`` forms too),
``--max-num-seqs``/``--max-running-requests`` (used as --max-concurrency when
that is not given), ``--api-key`` (vLLM: else ``$VLLM_API_KEY``; then requests need ``Authorization: Bearer
KEY``, answered 401 ``{"error":"Unauthorized"}`` otherwise: on vLLM's /v1
routes, on every SGLang route but /health and /metrics), SGLang's ``--enable-memory-saver`` and
``--enable-weights-cpu-backup`` (what a release loses, below). Every other flag is logged once and ignored.
``--health-path P`` moves the health check (default: the engine's own, /health); ``--port`` has no
default for an engine without one (openai).

Knobs: ``--startup-s`` (the port opens only after it, as vLLM listens only once
loaded: connections are refused meanwhile), ``--ttft-ms``, ``--itl-ms`` (per
further token), ``--max-concurrency`` (0 = unlimited; more requests wait),
faults ``--fail-rate F`` (that fraction of generations answered 500
``InternalServerError`` in the engine's error shape, drawn from ``--seed``),
``--die-after N`` (the process exits with os._exit(1) during generation
request N: a stream after its first token chunk, a plain request before its
answer), ``--stall-after N`` (every stream stops after N SSE chunks, role
chunk included, and keeps the connection open), ``--hang`` (generation
requests are read but never answered). Sleep tiers (router.sim.memory):
``--sleep-s`` (a level-1 sleep copying the weights to host RAM), ``--wake-s``
(a level-1 wake copying them back), ``--reload-s`` (a level-2 reload from disk).

Text and tokens: see `router.sim.textgen` (output token i of choice j is
``" " + WORDS[(crc32(prompt) + 7*j + i) % 64]``; prompt tokens = words).
Requests stop at ``max_tokens`` (default: context left) with
``finish_reason "length"``, or at the first ``stop`` string (text cut before
it, ``"stop"``, ``stop_reason`` = the string). ``n`` choices, ``echo``
(completions), a list of prompts, and ``stream_options.include_usage`` (a last
chunk with ``choices: []`` and ``usage``) work as in vLLM.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (and those below),
``GET /v1/models``, ``GET /health`` (200, empty body; or ``--health-path``), ``GET /metrics``.
openai (and SGLang): ``POST /v1/embeddings`` (``input`` a string, strings or token ids;
``dimensions``; vectors from `router.sim.textgen`). openai only: no sleep API; vLLM's answer
shapes with the plain OpenAI model list and metric names ``sim:...``.
vLLM only: ``GET /version``, ``POST /sleep?level=0|1|2&mode=abort|wait|keep``
(abort, the default, ends running requests with finish_reason "abort"; wait
lets them finish first; keep pauses them until wake; a sleep while asleep
deepens, never lightens), ``POST /wake_up``
(``?tags=weights``/``kv_cache`` wake parts; awake once both are),
``GET /is_sleeping`` -> ``{"is_sleeping": bool}``, ``POST /collective_rpc
{"method": "reload_weights"}`` (``{"results":[null]}``; 500 while the weights'
memory is asleep) and ``POST /reset_prefix_cache``. A generation arriving while
asleep is held, unanswered, until ``/wake_up`` (as real vLLM 0.32 does).
After a level-2 sleep the weights are gone: until ``reload_weights`` the engine
answers garbage (textgen.GARBAGE), and a generation run meanwhile leaves its
garbage in the prefix cache until ``/reset_prefix_cache``.
SGLang only: ``POST|GET /release_memory_occupation`` and
``/resume_memory_occupation`` (JSON body, optional ``tags``; answer ``null``),
``POST /update_weights_from_disk {"model_path"}`` (only the engine's own path
loads), ``GET|POST /flush_cache``, ``GET /get_server_info`` (with
``enable_memory_saver`` and ``enable_weights_cpu_backup``), ``GET /get_model_info``,
``GET /health_generate``. With ``--enable-memory-saver`` and without
``--enable-weights-cpu-backup`` a release loses the weights: answers are garbage
until both ``/update_weights_from_disk`` and ``/flush_cache`` ran; with the backup,
or without the saver, they are right on resume.
SGLang refuses a release while requests run (its scheduler asserts it is idle;
we answer 400 instead of crashing); SGLang itself has no gate for requests
sent while released (they would run on released GPU memory), so the simulator
answers them 500 to make such routing visible, and /health_generate 503.
Every dialect: ``GET /sim/state`` (the simulator's own, no engine has it):
sleep state, whether answers are right, the counters, and the sleep-API calls in
order (``"sleep level=2"``, ``"wake_up tags=weights"``, ``"collective_rpc
reload_weights"``, ...), also `SimEngine.calls`.
SGLang does not check the request's ``model``; vLLM answers an unknown one 404
``NotFoundError``.

Each dialect's routes are its module (vllm_api.py, sglang_api.py, openai_api.py).
Other client paths (router/sim/paths.py; every path of router.engines' ``client_paths``):
vLLM ``POST /v1/responses`` (plain, streamed as Responses events, ``background``; stored
unless ``store`` is false, so ``GET /v1/responses/{id}`` retrieves, ``POST
/v1/responses/{id}/cancel`` cancels a running background one and answers a finished one
400, and ``previous_response_id`` continues a stored conversation; real vLLM 0.32 stores
only with VLLM_ENABLE_RESPONSES_API_STORE=1), ``/v1/messages`` (Anthropic, whole and
streamed; Anthropic-shaped engine errors), ``/v1/messages/count_tokens``, ``/tokenize``,
``/detokenize``, ``/v1/chat/completions/batch``, ``/invocations``, and multipart
``/v1/audio/transcriptions|translations`` (``{"text"}`` from the file bytes); its pooling
paths answer 404 as a generative vLLM does. SGLang: ``/v1/responses``, ``[/v1]/tokenize``,
``[/v1]/detokenize``, ``/v1/score``, ``/v1/rerank``, ``/v1/classify``, ``/invocations``,
``/v1/embeddings`` (shapes approximated from SGLang's serving code).

Errors: ``{"error": {"message", "type", "param", "code"}}`` with type
``BadRequestError`` (400: bad JSON, bad field, ``max_tokens`` beyond the
context), ``NotFoundError`` (404) or ``InternalServerError`` (500). Unknown
paths get ``{"detail": "Not Found"}`` (404) and wrong methods 405, as FastAPI.

Cost (``python -m router.sim.loadtest``, 2-core machine, client in another
process): about 45 us of simulator CPU per non-streaming request (16 tokens,
concurrency 64) and about 22 us per streamed chunk (1,000 concurrent streams
of 50 tokens at 20 ms, request overhead included), 37 MiB RSS.

Metrics (``GET /metrics``, Prometheus text): vLLM ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total`` (labels engine, model_name); SGLang
``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
``sglang:prompt_tokens_total``, ``sglang:generation_tokens_total`` (label
model_name); and for tests ``sim_requests_total`` (generation requests
received), ``sim_client_disconnects_total`` (clients gone before their answer
ended: mid-stream, queued, held asleep, or hung), ``sim_sleep_calls_total``,
``sim_wake_calls_total``, ``sim_reload_calls_total`` (weight reloads done),
``sim_cache_resets_total`` (prefix-cache resets done) and the gauge
``sim_answers_right`` (0 while the text would be garbage).
"""
from .engine import SimEngine
from .options import SimOptions, parse_options

__all__ = ["SimEngine", "SimOptions", "parse_options"]
