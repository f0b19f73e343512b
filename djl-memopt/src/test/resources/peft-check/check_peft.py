# Checks adapters saved by djl-memopt against Hugging Face PEFT: for each case in cases.json, loads the tiny
# DeepSeek-V3 fixture with transformers (fp32, eager attention, CPU), applies the adapter with PeftModel.from_pretrained,
# and compares the logits of input_ids.npy with djl-memopt's own (the .npy beside the adapter). It also checks that PEFT
# adapted exactly the modules and parameters djl-memopt wrote (targeted_module_names + targeted_parameter_names) and
# that every tensor of the file reached the model unchanged. Written by PeftCompatibilityTest (djl-memopt tests).
# Run: cd .gpu/peft && python3 check_peft.py        exit status 0 when every case passes
import json, os, sys, traceback
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; the GPU machine has no network
import numpy as np
import torch, transformers, peft
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

here = os.path.dirname(os.path.abspath(__file__))
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
ids = torch.from_numpy(np.load(os.path.join(here, "input_ids.npy")))
cases = json.load(open(os.path.join(here, "cases.json")))


def base_model():
    return AutoModelForCausalLM.from_pretrained(os.path.join(here, "tiny-deepseek-v3"), torch_dtype=torch.float32,
                                                attn_implementation="eager").eval()


with torch.no_grad():
    base_logits = base_model()(input_ids=ids).logits.float().numpy()

rows, failed = [], 0
for case in cases:
    name, tol = case["name"], case["tolerance"]
    want = np.load(os.path.join(here, case["logits"]))
    try:
        pm = PeftModel.from_pretrained(base_model(), os.path.join(here, case["adapter"])).eval()
        with torch.no_grad():
            got = pm(input_ids=ids).logits.float().numpy()
        diff = float(np.abs(got - want).max())
        effect = float(np.abs(base_logits - want).max())
        lora = pm.base_model
        targeted = set(lora.targeted_module_names) | set(getattr(lora, "targeted_parameter_names", []))
        expected = set(case["peft_targets"])
        saved = load_file(os.path.join(here, case["adapter"], "adapter_model.safetensors"))
        state = get_peft_model_state_dict(pm, save_embedding_layers=False)
        tensors_ok = set(saved) == set(state) and all(torch.equal(saved[k], state[k].cpu()) for k in saved)
        notes = []
        if targeted != expected:
            notes.append(f"PEFT adapted {sorted(targeted - expected)} extra, {sorted(expected - targeted)} missing")
        if not tensors_ok:
            notes.append(f"tensors differ: file-only {sorted(set(saved) - set(state))[:4]}, "
                         f"model-only {sorted(set(state) - set(saved))[:4]}")
        ok = diff < tol and targeted == expected and tensors_ok
    except Exception as e:  # a case that PEFT refuses is a failure, reported, and the others still run
        traceback.print_exc()
        diff, effect, ok, notes = float("nan"), float("nan"), False, [f"{type(e).__name__}: {e}"]
    failed += 0 if ok else 1
    rows.append((name, "PASS" if ok else "FAIL", diff, effect, len(case["peft_targets"]), "; ".join(notes)))

print()
print(f"{'case':<24} {'result':<6} {'max |peft - ours|':>18} {'adapter effect':>15} {'targets':>8}  notes")
for name, res, diff, effect, n, notes in rows:
    print(f"{name:<24} {res:<6} {diff:>18.3g} {effect:>15.3g} {n:>8}  {notes}")
print(f"\n{len(rows) - failed} of {len(rows)} cases pass (tolerance {cases[0]['tolerance']:g} on the logits)")
sys.exit(1 if failed else 0)
