"""`generate()` of the exported causal LM: greedy tokens are tools/generate.py's, token for token;
after the prompt every step feeds one token into the recurrent state, whose size does not grow
with the number of tokens; left-padded batches give each prompt its own tokens."""
import pytest
import torch

from megatron_transnormer.generation import Sampling, generate_tokens
from tests.export.conftest import project_model, run_tool

pytestmark = pytest.mark.usefixtures("single_process")
PROMPTS = ["KING.\nWhat", "HAMLET. To be, or not to be", "A"]
NEW = 40


@pytest.fixture(scope="module")
def hf_lm(alm_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = alm_export[0]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(out, trust_remote_code=True)


def _cache(output):
    return output.cache if hasattr(output, "cache") else output.past_key_values


def test_greedy_generate_is_the_tools(alm_run, hf_lm):
    """The tool's text, the library's tokens (what the tool streams) and transformers' generate agree;
    generation stops at the end-of-document id in all three."""
    model, tokenizer = hf_lm
    ours, _ = project_model(alm_run)
    eod = tokenizer.eos_token_id
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        prompt = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
        generated = model.generate(prompt, max_new_tokens=NEW, do_sample=False)[0, prompt.shape[1]:].tolist()
    finally:
        hook.remove()
    assert lengths[0] == prompt.shape[1] and set(lengths[1:]) == {1}  # the prompt once, then one token a step
    new = generated[:generated.index(eod)] if eod in generated else generated
    assert len(new) > 0
    expected = generate_tokens(ours, [prompt[0].tolist()], NEW, Sampling(temperature=0), stop_ids=[eod])[0]
    assert new == expected
    p = run_tool("generate.py", "--checkpoint", str(alm_run), "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW),
                 "--temperature", "0")
    assert p.returncode == 0, p.stderr
    assert p.stdout == PROMPTS[0] + tokenizer.decode(new) + "\n"


def test_the_recurrent_state_does_not_grow(hf_lm):
    """The cache after 3 and after 60 new tokens holds the same bytes: per NormAttention layer the
    [B, H, D, E] state, per DiagAttention layer one block of keys and values."""
    model, tokenizer = hf_lm
    prompt = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    sizes = {}
    for new in (3, 60):
        out = model.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True)
        cache = _cache(out)
        assert type(cache).__name__ == "TransNormerCache"
        assert cache.columns == out.sequences.shape[1] - 1  # every token but the last went into the state
        sizes[new] = cache.nbytes()
        cfg = model.config
        head_dim = cfg.hidden_size // cfg.num_heads
        diag, norm = cache.states
        assert [tuple(t.shape) for t in diag] == [(2, cfg.num_heads, cfg.block_size, head_dim)] * 2
        assert tuple(norm.shape) == (2, cfg.num_heads, head_dim, head_dim)
    assert sizes[3] == sizes[60]


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(alm_run, hf_lm):
    model, tokenizer = hf_lm
    ours, _ = project_model(alm_run)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and not batch.attention_mask.all()
    together = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    width = batch.input_ids.shape[1]
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    alone = generate_tokens(ours, prompts, NEW, Sampling(temperature=0))
    for i, prompt in enumerate(prompts):
        single = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        assert together[i, width:].tolist() == single[0, len(prompt):].tolist() == alone[i]


def test_beam_search_reorders_the_state(hf_lm):
    """Beam search keeps rows of the recurrent state with their beams: the same sequences as
    recomputing every prefix without a cache."""
    model, tokenizer = hf_lm
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    settings = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False)
    assert model.generate(**batch, **settings).tolist() == model.generate(**batch, **settings, use_cache=False).tolist()
