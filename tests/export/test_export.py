"""tools/export_hf.py and the exported models: their logits are the project model's (float32),
for the trained causal LM and masked LM and for every layer pattern and setting the export
covers; they load without this package; the package registers the classes with the Auto
classes; what is not covered is refused by name."""
import dataclasses
import json
import subprocess
import sys
import sysconfig

import pytest
import torch

from tests.export.conftest import export_tool, project_model
from tests.model.conftest import small_config

pytestmark = pytest.mark.usefixtures("single_process")
TOL = dict(rtol=1e-5, atol=1e-5)


def _ids(n: int, rows: int = 2, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, n))


def test_the_tool_writes_a_model_directory(alm_export):
    out, p = alm_export
    names = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "configuration_transnormer.py", "modeling_transnormer.py"}
    assert {f.name for f in out.iterdir()} == names
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("exported ") and "(lm, 2 layers, vocabulary 512)" in lines[0]
    assert lines[0].endswith(f"to {out}: " + ", ".join(sorted(names)))
    assert lines[1] == (f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, "
                        f"trust_remote_code=True)")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_transnormer.TransNormerConfig",
                                  "AutoModelForCausalLM": "modeling_transnormer.TransNormerForCausalLM"}
    assert (config["model_type"], config["layers"], config["hidden_size"]) == ("transnormer", ["diag", "norm"], 32)
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "transnormer.layers.1.mixer.lrpe.u" in f.keys() and "transnormer.embedding.word.weight" in f.keys()


def test_causal_lm_logits_are_the_projects(alm_run, alm_export):
    """150 tokens: across DiagAttention blocks (32) and NormAttention chunks (64)."""
    from transformers import AutoModelForCausalLM

    ours, _ = project_model(alm_run)
    hf = AutoModelForCausalLM.from_pretrained(alm_export[0], trust_remote_code=True).eval()
    assert type(hf).__module__.startswith("transformers_modules.")  # the copied code, not this package's
    ids = _ids(150)
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(hf(ids).logits, logits, **TOL)
        # labels as transformers has them: the inputs, each position predicting the next
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(hf(ids, labels=ids).loss, expected, **TOL)


def test_masked_lm_logits_are_the_projects(blm_run, blm_export):
    """Padding after a shorter row: the masked LM's padding mask is its attention_mask."""
    from transformers import AutoModelForMaskedLM

    ours, cfg = project_model(blm_run)
    hf = AutoModelForMaskedLM.from_pretrained(blm_export, trust_remote_code=True).eval()
    ids = _ids(64, rows=3)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 37:] = False
    positions = torch.arange(64).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, attention_mask=valid.long()).logits, ours(ids, positions, valid), **TOL)
        logits = ours(ids, positions)
        torch.testing.assert_close(hf(ids).logits, logits, **TOL)
        labels = torch.full_like(ids, -100)
        labels[:, 5:9] = ids[:, 5:9]  # predicted only there
        expected = torch.nn.functional.cross_entropy(logits[:, 5:9].flatten(0, 1), ids[:, 5:9].flatten())
        torch.testing.assert_close(hf(ids, labels=labels).loss, expected, **TOL)


ISOLATED = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # site-packages without its .pth files (python -S): no editable install of the project
hidden = [m for m in ("megatron_transnormer", "transnormer_kernels") if importlib.util.find_spec(m) is not None]
assert not hidden, f"{hidden} importable: the test would prove nothing"
import torch, transformers
ids = torch.tensor(json.loads(sys.argv[3]))
lm = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
with torch.no_grad():
    logits = lm(ids).logits
    tokens = lm.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, min_new_tokens=6)
torch.save({"logits": logits, "tokens": tokens}, sys.argv[4])
project = ("megatron_transnormer", "transnormer_kernels", "megatron", "deepspeed")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in project)))
"""


def test_the_export_runs_without_this_package(alm_run, alm_export, tmp_path):
    """A fresh interpreter with site-packages but not the project (-S skips the editable install's
    .pth; the working directory is elsewhere) loads, runs and generates; the copied code imports
    only the standard library, torch and transformers."""
    ids = _ids(40)
    p = subprocess.run([sys.executable, "-S", "-c", ISOLATED, sysconfig.get_paths()["purelib"], str(alm_export[0]),
                        json.dumps(ids.tolist()), str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    ours, _ = project_model(alm_run)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], ours(ids), **TOL)
    assert got["tokens"].shape == (1, 11)
    for name in ("modeling_transnormer.py", "configuration_transnormer.py"):
        source = (alm_export[0] / name).read_text()
        imported = {line.split()[1].split(".")[0] for line in source.splitlines()
                    if line.startswith(("import ", "from ")) and not line.startswith("from .")}
        assert imported <= {"__future__", "array", "dataclasses", "math", "torch", "transformers"}, (name, imported)


def test_the_package_registers_the_auto_classes(alm_export):
    import transformers
    from megatron_transnormer.hf import TransNormerConfig, TransNormerForCausalLM, TransNormerForMaskedLM

    assert transformers.AutoConfig.for_model("transnormer").__class__ is TransNormerConfig
    loaded = transformers.AutoModelForCausalLM.from_pretrained(alm_export[0])  # no remote code needed
    assert type(loaded) is TransNormerForCausalLM
    masked = TransNormerConfig(vocab_size=96, hidden_size=32, num_heads=4, num_layers=2, causal=False, head="masked_lm",
                               ffn_hidden_size=40)
    assert type(transformers.AutoModelForMaskedLM.from_config(masked)) is TransNormerForMaskedLM


CASES = {
    "t1_decay_post_norm": dict(variant="t1", decay=True, norm_position="post"),
    "t2_decay_gelu": dict(variant="t2", decay=True, mlp="gelu", ffn_hidden_size=48),
    "norm_diag_relu_block16": dict(layers=["norm", "diag", "norm", "diag"], block_size=16, mlp="relu",
                                   ffn_hidden_size=48),
    "learned_positions": dict(positions="learned", max_positions=160, embedding_scale=False, embedding_norm=True),
    "masked_t1": dict(causal=False, variant="t1", positions="learned", max_positions=160),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_covered_setting_gives_the_projects_logits(case, plays, tmp_path):
    """Random weights of the project's model (blocks of 8 unless set), exported by the library and
    loaded by transformers: the same logits over 150 tokens, and, for the causal LM, the same
    logits again token by token from the recurrent state after a 37-token prompt."""
    from megatron_transnormer.data import load_dataset_info
    from megatron_transnormer.data.tokenizers import dataset_tokenizer
    from megatron_transnormer.hf import export
    from megatron_transnormer.model import build_model
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model_cfg = small_config(vocab_size=512, **CASES[case])
    ours = build_model(model_cfg, seed=7).eval()
    tokenizer = dataset_tokenizer(load_dataset_info(str(plays)))
    export({"model": dataclasses.asdict(model_cfg)}, ours.state_dict(), tokenizer, tmp_path)
    auto = AutoModelForCausalLM if model_cfg.head == "lm" else AutoModelForMaskedLM
    hf = auto.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = _ids(150)
    with torch.no_grad():
        full = ours(ids)
        torch.testing.assert_close(hf(ids).logits, full, **TOL)
        if model_cfg.head == "lm":
            out = hf(ids[:, :37], use_cache=True)
            torch.testing.assert_close(out.logits, full[:, :37], **TOL)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            for t in range(37, 150):
                step = hf(ids[:, t:t + 1], cache=cache).logits[:, 0]
                torch.testing.assert_close(step, full[:, t], **TOL, msg=lambda m: f"position {t}: {m}")


def test_what_the_export_does_not_cover_is_refused_by_name(plays, tmp_path, capsys):
    from megatron_transnormer.data import load_dataset_info
    from megatron_transnormer.data.tokenizers import dataset_tokenizer
    from megatron_transnormer.hf import ExportError
    from megatron_transnormer.hf.export import hf_config

    tokenizer = dataset_tokenizer(load_dataset_info(str(plays)))
    for change, needle in ((dict(arch="vanilla"), "model.arch='vanilla'"),
                           (dict(layers=["diag", "softmax"]), "model.layers holds softmax"),
                           (dict(head="classification", num_classes=2), "model.head='classification'"),
                           (dict(vocab_size=96), "model.vocab_size=96"),
                           (dict(norm="layernorm"), "model.norm='layernorm'")):
        model = {**dataclasses.asdict(small_config(vocab_size=512)), **change}
        with pytest.raises(ExportError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            hf_config(model, tokenizer)
    assert export_tool().main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export_hf.py: error: ")]
    assert len(errors) == 1 and f"{tmp_path / 'nothing'}: no checkpoint there" in errors[0]
    assert not (tmp_path / "out").exists()
