"""Real checkpoints: .bin loads through the weights-only loader (a code payload is refused), delta weights
rebuild exactly, and `medtune template show` prints what a model is trained on."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from references import TOKENIZERS


class Payload:
    """A pickle that runs a command when loaded with plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bin_copy(tiny_base, out, state: dict) -> None:
    """``tiny_base`` as a .bin-only model directory holding ``state``."""
    out.mkdir()
    for name in os.listdir(tiny_base):
        if not name.endswith(".safetensors"):
            shutil.copy(tiny_base / name, out / name)
    torch.save(state, out / "pytorch_model.bin")


def test_bin_only_base_loads_and_a_code_payload_is_refused(tiny_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from medtune.model.load import ModelError, load_weights
    from medtune.train import main

    reference = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    bin_copy(tiny_base, tmp_path / "plain", reference.state_dict())
    loaded = load_weights(AutoModelForCausalLM, str(tmp_path / "plain")).eval()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)

    marker = tmp_path / "payload-ran"
    bin_copy(tiny_base, tmp_path / "evil", {"model.embed_tokens.weight": Payload(marker)})
    with pytest.raises(ModelError, match="refused to load a .bin checkpoint"):
        load_weights(AutoModelForCausalLM, str(tmp_path / "evil"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{base: {tmp_path / 'evil'}}}\ndata: {{train_files: [{tiny_base / 'config.json'}]}}\n")
    code = main([str(recipe), f"output.dir={tmp_path / 'run'}"])
    assert code == 2 and not marker.exists()


def test_apply_delta_round_trips_with_an_extended_vocabulary(tiny_base, tmp_path, capsys):
    """base + delta = target exactly; the delta's extra vocabulary rows are taken as they are."""
    from transformers import AutoModelForCausalLM

    from medtune.infer.apply_delta import main

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    vocab = base.config.vocab_size
    torch.manual_seed(1)
    delta = {k: torch.randn_like(v) * 0.01 for k, v in base.state_dict().items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # 64 rows the base does not have
        delta[key] = torch.cat([delta[key], torch.randn(64, delta[key].shape[1]) * 0.01])
    target = {k: v.clone() for k, v in delta.items()}
    for k, v in base.state_dict().items():
        target[k][: v.shape[0]] += v
    delta_dir = tmp_path / "delta"
    bin_copy(tiny_base, delta_dir, delta)  # Ziya's delta ships as .bin
    config = (delta_dir / "config.json").read_text().replace(f'"vocab_size": {vocab}', f'"vocab_size": {vocab + 64}')
    (delta_dir / "config.json").write_text(config)
    assert (
        main(["--base", str(tiny_base), "--delta", str(delta_dir), "--out", str(tmp_path / "out"), "--dtype", "fp32"])
        == 0
    )
    assert "max |reloaded - (base + delta)| = 0.00e+00" in capsys.readouterr().out
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert max((rebuilt[k] - target[k]).abs().max().item() for k in target) == 0
    # a second run into the same output replaces its own earlier output; a foreign folder is refused
    assert (
        main(["--base", str(tiny_base), "--delta", str(delta_dir), "--out", str(tmp_path / "out"), "--dtype", "fp32"])
        == 0
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["--base", str(tiny_base), "--delta", str(delta_dir), "--out", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not (TOKENIZERS / "chinese_llama2").is_dir(), reason="../shared/tokenizers is needed")
def test_template_show_marks_the_trained_tokens(tmp_path, capsys):
    import json

    from medtune.cli import main

    messages = [{"role": "user", "content": "山楂可以降血脂吗？"}, {"role": "assistant", "content": "可以适量食用。"}]
    (tmp_path / "m.json").write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    assert (
        main(
            [
                "template",
                "show",
                "llama2_zh",
                "--tokenizer",
                str(TOKENIZERS / "chinese_llama2"),
                "--messages",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "(sentencepiece, 55296 tokens)" in out and "[INST] <<SYS>>" in out
    trained = [line.split()[-1] for line in out.splitlines() if line[6:7] == "*"]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZERS / "chinese_llama2" / "tokenizer.model"))
    assert trained == [repr(p) for p in sp.encode("可以适量食用。", out_type=str)] + ["'</s>'"]
    assert main(["template", "show", "chatmed", "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "no such tokenizer directory" in capsys.readouterr().err
