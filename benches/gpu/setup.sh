#!/usr/bin/env bash
# On the GPU machine, once per fresh machine: unpack the binary, install the carried wheels
# (TransformerLens 4.3 and the versions of its pure-Python dependencies it was tested with here)
# into /tmp/site, and give the bench models their tokenizers. Then: export PYTHONPATH=/tmp/site.
set -euo pipefail
cd "$(dirname "$0")"
[ -f tl-run ] || { gunzip -k tl-run.gz && chmod +x tl-run; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl 2>&1 | grep -v WARNING || true
cp models/gpt2-tiny/tokenizer.json models/gpt2-small-shaped/
cp models/smollm2-shaped/tokenizer.json models/smollm2-shaped/tokenizer_config.json models/llama8b/
export LD_LIBRARY_PATH="$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"
./tl-run --version
PYTHONPATH=/tmp/site python3 -c 'import torch, transformers, transformer_lens; print("torch", torch.__version__, torch.cuda.is_available(), "transformers", transformers.__version__, "transformer_lens ok")'
