"""The original projects' tokenization, re-implemented small, as the tests' reference (../shared/template_spec.md).

Nothing here imports medtune: a test compares medtune's ids with these.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
TOKENIZERS = SHARED / "tokenizers"
DATA = SHARED / "data"
IGNORE = -100


class LegacyLlamaTokenizer:
    """The 2023 slow ``LlamaTokenizer`` (transformers 4.28-4.35, legacy): the text is split at special token
    strings, and every other chunk is encoded by ``sentencepiece`` on its own (so with its dummy prefix)."""

    def __init__(self, model_file: Path, extra_tokens: dict[str, int] | None = None):
        import sentencepiece

        self.name = Path(model_file).parent.name
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.specials = {"<s>": 1, "</s>": 2, "<unk>": 0, **(extra_tokens or {})}
        self._split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")

    def __call__(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [1] if add_special_tokens else []  # add_bos_token=True, add_eos_token=False
        for chunk in self._split.split(text):
            if chunk in self.specials:
                ids.append(self.specials[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def convert_tokens_to_ids(self, token: str) -> list[int]:
        """LLaMA-Efficient-Tuning's {"token": …}: the id when the vocabulary has it (Ziya's <human>/<bot>);
        a vocabulary without it gets the text (where the reference would write <unk>)."""
        if token in self.specials:
            return [self.specials[token]]
        piece = self.sp.piece_to_id(token)
        return [piece] if self.sp.id_to_piece(piece) == token else self(token, add_special_tokens=False)


def promptcblue_chatmed(tok: LegacyLlamaTokenizer, q: str, a: str) -> tuple[list[int], list[int]]:
    """michael-wzhu/PromptCBLUE src/ft_llama_lora/run_clm_pt_with_peft.py, tokenize_function."""
    prompt = f"<s>问：\n{q}\n答：\n"
    answer = f"{a}\n</s>"
    prompt_len = len(tok(prompt, add_special_tokens=False))
    ids = tok(prompt + answer, add_special_tokens=False)
    return ids, [IGNORE] * prompt_len + ids[prompt_len:]


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
)
ALPACA2_PROMPT = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]"
ALPACA2_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"


def build_dataset_pair(tok: LegacyLlamaTokenizer, source: str, output: str) -> tuple[list[int], list[int]]:
    """ymcui/Chinese-LLaMA-Alpaca(-2) scripts/training/build_dataset.py: source with BOS, target =
    tokenizer(output + '</s>', add_special_tokens=False); the source masked."""
    s = tok(source)
    t = tok(output + "</s>", add_special_tokens=False)
    return s + t, [IGNORE] * len(s) + t


def alpaca2_demo_prompt(tok: LegacyLlamaTokenizer, turns: list[tuple[str, str]], query: str, system: str) -> list[int]:
    """Chinese-LLaMA-Alpaca-2's gradio demo, one string with BOS: '[INST] <<SYS>>…{q1} [/INST] {a1}</s><s>[INST]
    {q} [/INST]'."""
    questions = [q for q, _ in turns] + [query]
    text = ""
    for i, q in enumerate(questions):
        text += ("<s>" if i else "") + (
            ALPACA2_PROMPT.format(system=system, instruction=q) if i == 0 else f"[INST] {q} [/INST]"
        )
        if i < len(turns):
            text += f" {turns[i][1]}</s>"
    return tok(text)


def zhongjing_ziya(
    tok: LegacyLlamaTokenizer, turns: list[tuple[str, str]], system: str = ""
) -> tuple[list[int], list[int]]:
    """Zhongjing's ziya template: prefix = BOS (+ system + '\\n') first, '\\n' + BOS later; query = <human> +
    ':{q}\\n' + <bot> + ':'; answer = '{a}' + EOS; every piece encoded alone, add_special_tokens=False."""
    enc = lambda text: tok(text, add_special_tokens=False)  # noqa: E731
    ids: list[int] = []
    labels: list[int] = []
    for i, (q, a) in enumerate(turns):
        if i == 0:
            prefix = [1] + (enc(system) + enc("\n") if system else [])
        else:
            prefix = enc("\n") + [1]
        query = tok.convert_tokens_to_ids("<human>") + enc(f":{q}\n") + tok.convert_tokens_to_ids("<bot>") + enc(":")
        answer = enc(a) + [2]
        ids += prefix + query + answer
        labels += [IGNORE] * len(prefix + query) + answer
    return ids, labels


def chatmed_texts(limit: int) -> list[tuple[str, str]]:
    """(question, answer) of the real ChatMed-Consult sample, the <s>问：…答： wrapper removed."""
    pairs = []
    with (DATA / "chatmed_consult_test_full.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            q = row["query"].strip().removeprefix("<s>").strip().removeprefix("问：").strip()
            q = q.removesuffix("答：").strip()
            pairs.append((q, row["response"].strip()))
            if len(pairs) == limit:
                break
    return pairs


def cmtmedqa_dialogues(limit: int, min_turns: int = 2) -> list[list[tuple[str, str]]]:
    """Multi-turn doctor-patient dialogues of the real CMtMedQA test set, as (question, answer) turns."""
    rows = json.loads((DATA / "cmtmedqa_test_full.json").read_text(encoding="utf-8"))
    out = []
    for row in rows:
        history = row.get("history") or []
        question = (row.get("instruction") or row.get("instruct") or "").strip()
        if row.get("input"):
            question = f"{question}\n{row['input'].strip()}"
        turns = [(h[0].strip(), h[1].strip()) for h in history] + [(question, row["output"].strip())]
        if len(turns) >= min_turns and all(q and a for q, a in turns):
            out.append(turns)
        if len(out) == limit:
            break
    return out


def as_messages(turns: list[tuple[str, str]], system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


SYSTEM = "你是一名经验丰富的全科医生，请用中文回答。"  # the system message of every other real conversation


def real_conversations(reasoning: bool = False) -> list[list[dict[str, str]]]:
    """40 real conversations: 20 single-turn, 20 multi-turn; every other one with a system message; with
    ``reasoning``, each last reply carries one (its own first sentence: real text, as a reasoning block)."""
    single = [[(q, a)] for q, a in chatmed_texts(20)]
    out = []
    for n, turns in enumerate(single + cmtmedqa_dialogues(20)):
        messages = [{"role": "system", "content": SYSTEM}] if n % 2 else []
        for q, a in turns:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if reasoning:
            answer = messages[-1]["content"]
            messages[-1] = {**messages[-1], "reasoning": answer.split("。")[0] + "。先想清楚再回答。"}
        out.append(messages)
    assert len(out) == 40
    return out
