"""Generate the shipped sample conversations (Belle format, Chinese and English, multi-turn).

    python data/make_sample_data.py     # rewrites data/sample_belle.jsonl and data/sample_belle_eval.jsonl

The tasks are ones a tiny model can learn in minutes on a CPU, and whose answers are checkable:
repeat, reverse, first/last word, count words, add digits; follow-up turns refer to the previous
answer ("now reverse that"), so the model must use the conversation, not just the last turn.
"""

import json
import random
from pathlib import Path

EN_WORDS = ("apple banana cherry river mountain cloud stone green blue red cat dog fish bird tree "
            "house road light music paper window table chair bread milk sun moon star rain snow").split()
ZH_WORDS = "苹果 香蕉 河流 高山 白云 石头 绿色 蓝色 红色 小猫 小狗 鱼 鸟 大树 房子 道路 灯光 音乐 纸 窗户 桌子 椅子 面包 牛奶 太阳 月亮 星星 雨 雪".split()


def words(rng, pool):
    # Two or three: with lists of up to 5 or more words the tiny model learned to copy much later.
    return rng.sample(pool, rng.randint(2, 3))


def first_turn(rng, zh):
    w = words(rng, ZH_WORDS if zh else EN_WORDS)
    # The words start a new line, as they start the answer: the same tokens, so copying is learnable.
    s = "\n" + " ".join(w)
    # Mostly tasks that copy: they teach the model to use the conversation, which everything else needs.
    kind = rng.choice(["repeat"] * 4 + ["reverse"] * 2 + ["first", "last", "count", "add"])
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q = f"{a} 加 {b} 等于多少？" if zh else f"What is {a} plus {b}?"
        return q, str(a + b), [str(a + b)]
    if kind == "repeat":
        q = f"请重复：{s}" if zh else f"Repeat after me:{s}"
        return q, " ".join(w), w
    if kind == "reverse":
        q = f"把这些词倒过来：{s}" if zh else f"Reverse the words:{s}"
        return q, " ".join(reversed(w)), list(reversed(w))
    if kind == "first":
        q = f"第一个词是什么：{s}" if zh else f"What is the first word:{s}"
        return q, w[0], [w[0]]
    if kind == "last":
        q = f"最后一个词是什么：{s}" if zh else f"What is the last word:{s}"
        return q, w[-1], [w[-1]]
    q = f"这里有几个词：{s}" if zh else f"How many words:{s}"
    a = {2: "两个", 3: "三个"}[len(w)] if zh else str(len(w))
    return q, a, [a]


def follow_up(rng, zh, last):
    kind = rng.choice(["again"] * 3 + ["reverse"] * 2 + ["first"] * 2 + ["last"] * 2)
    if kind == "again":
        return ("再说一遍。" if zh else "Say that again."), " ".join(last)
    if kind == "reverse":
        return ("现在倒过来。" if zh else "Now reverse that."), " ".join(reversed(last))
    if kind == "first":
        return ("第一个词是什么？" if zh else "What is the first word?"), last[0]
    return ("最后一个词是什么？" if zh else "What is the last word?"), last[-1]


def conversation(rng):
    zh = rng.random() < 0.5
    turns = []
    if rng.random() < 0.2:
        turns.append({"from": "system", "value": "你是一个乐于助人的助手。" if zh else "You are a helpful assistant."})
    q, a, last = first_turn(rng, zh)
    turns += [{"from": "human", "value": q}, {"from": "assistant", "value": a}]
    for _ in range(rng.choice([0, 1, 1, 2])):
        q, a = follow_up(rng, zh, last)
        last = a.split()
        turns += [{"from": "human", "value": q}, {"from": "assistant", "value": a}]
    return {"conversations": turns}


def main(out_dir=Path(__file__).resolve().parent, n_train=27000, n_eval=100, seed=1234):
    rng = random.Random(seed)
    for name, n in (("sample_belle.jsonl", n_train), ("sample_belle_eval.jsonl", n_eval)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
