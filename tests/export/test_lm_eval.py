"""lm-evaluation-harness on an exported model: the repository's local task
(tasks/lm_eval/plays_cloze.yaml, nothing downloaded) run through `lm_eval.simple_evaluate`
with the `hf` model; every continuation's log-likelihood it reports is the sum of the
project model's token log-probabilities (the loss tools/evaluate.py sums), and its accuracy
follows from them."""
import pytest
import torch

from megatron_transnormer.training.objectives import IGNORE, vocab_nll_sum
from tests.export.conftest import REPO, project_model

pytestmark = pytest.mark.usefixtures("single_process")
TASK = "transnormer_plays_cloze"


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-evaluation-harness splits the pair: the tokens of
    context + continuation after those of the context, each text after the end-of-document id
    (what the export's tokenizer adds, and what precedes every document in training)."""
    head = [tokenizer.eod_id] + tokenizer.encode(context)
    whole = torch.tensor([[tokenizer.eod_id] + tokenizer.encode(context + continuation)])
    labels = whole[:, 1:].clone()
    labels[:, :len(head) - 1] = IGNORE
    with torch.no_grad():
        return -vocab_nll_sum(model(whole[:, :-1]), labels).item()


def test_lm_eval_scores_the_projects_loglikelihoods(alm_run, alm_export):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_transnormer.data import load_dataset_info
    from megatron_transnormer.data.tokenizers import dataset_tokenizer

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={alm_export[0]},trust_remote_code=True,dtype=float32", tasks=[TASK],
        task_manager=TaskManager(include_path=str(REPO / "tasks" / "lm_eval")), device="cpu", batch_size=4,
        log_samples=True)
    samples = results["samples"][TASK]
    assert len(samples) == 8
    ours, cfg = project_model(alm_run)
    tokenizer = dataset_tokenizer(load_dataset_info(cfg.data.path))
    correct = 0
    for sample in samples:
        theirs = [resp[0][0] for resp in sample["resps"]]
        mine = [_loglikelihood(ours, tokenizer, *args) for args in sample["arguments"]]
        assert [args[1] for args in sample["arguments"]] == [" " + c for c in sample["doc"]["choices"]]
        assert theirs == pytest.approx(mine, abs=1e-4, rel=1e-5)
        correct += int(max(range(len(mine)), key=mine.__getitem__) == sample["doc"]["answer"])
    assert results["results"][TASK]["acc,none"] == pytest.approx(correct / len(samples))
