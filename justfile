# Recipes for gpu-fabric. Quick start: `just up` runs the platform, `just test` runs the tests.
set shell := ["bash", "-euo", "pipefail", "-c"]

# Run the whole platform locally: NATS, gateway, scheduler, projections and one worker (Ctrl-C stops it all).
up *ARGS:
    gpuctl up {{ARGS}}

# Run the test suite (a real nats-server from the wheel; slow end-to-end tests included).
test *ARGS: test-tools
    python -m pytest -q --durations=15 {{ARGS}}
    just test-npm

# What the tests need beyond Python packages: Debian's chromium (the dashboard's browser test; Playwright
# never downloads a browser here) and node with npm (the `npx gpu-worker` launcher's tests). Installed
# with apt when missing, so `just test` works on a fresh machine.
test-tools:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v npm >/dev/null || missing+=(nodejs npm)
    [ ${#missing[@]} -eq 0 ] && exit 0
    if ! command -v apt-get >/dev/null; then
        echo "the tests need: ${missing[*]} (install them with your package manager)" >&2
        exit 1
    fi
    sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
    echo "installing ${missing[*]} for the tests (apt)" >&2
    $sudo apt-get update -q && $sudo apt-get install -y -q "${missing[@]}"

# The `npx gpu-worker` launcher's tests (node's own runner; one packs it and installs this checkout).
test-npm:
    cd npm && node --test test/

# Run only the fast tests (no multi-process end-to-end stacks).
test-fast *ARGS:
    python -m pytest -q -m "not slow" {{ARGS}}

# Lint: unused imports, undefined names, import order.
lint:
    ruff check sdk gateway scheduler worker projections bench tests

# Benchmarks: echo jobs through the platform vs raw JetStream, the LLM overhead, placement at fleet scale,
# replaying the log (100,000 events; `python -m bench.replay --jobs 250000` for a million). Figures go to docs/benchmarks.md.
bench *ARGS:
    python -m bench.echo_throughput {{ARGS}}
    python -m bench.llm_overhead
    python -m bench.placement
    python -m bench.replay --jobs 25000 --rounds 3

# The same no-op job on the platform, Celery + Redis and taskiq + JetStream, back to back; one table of
# ratios (figures in docs/benchmarks.md). Installs the peers first: the `bench` extra and Debian's redis-server.
bench-peers *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))' \
        | xargs python -m pip install -q
    if ! command -v redis-server >/dev/null; then
        sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
        $sudo apt-get update -q && $sudo apt-get install -y -q redis-server
    fi
    python -m bench.peers {{ARGS}}

# Direct mode: a direct echo request vs a scheduled echo job vs raw NATS request-reply (docs/benchmarks.md).
bench-direct *ARGS:
    python -m bench.direct {{ARGS}}

# Rebuild the read models from the streams.
replay *ARGS:
    gpuctl replay {{ARGS}}

# Soak: a steady echo load over HTTP for a given time, printing each process's RSS per minute (figures in docs/benchmarks.md).
soak *ARGS:
    python -m bench.soak {{ARGS}}

# The CUDA path end to end on an NVIDIA machine, offline, under 5 minutes (random-weight models); on a
# machine without a GPU, a dry run of the checks the CPU can do. One table; non-zero exit on a failure.
gpu-check *ARGS:
    python -m bench.gpu_check {{ARGS}}

# Chaos: seeded rounds of steady load while a worker, the scheduler leader, a gateway, a projections replica
# or a NATS node is SIGKILLed; checks that no acknowledged job is lost or doubled and that the read models
# equal a fresh fold of the log. Figures go to docs/reliability.md.
chaos *ARGS:
    python -m bench.chaos --report docs/reliability.md {{ARGS}}
