"""
Praat TextGrids: the dataset's word and phone alignments (tier 0 phones, tier 1 words), read as the
Huth lab's dsutils reads them. tiny's pretraining names the phones, the probes read both, and
tasks.py cuts the words into clips.

    words = read_words(data.textgrid_path(root, "souls"))    # [(start s, end s, word)]
    phones = read_phones(data.textgrid_path(root, "souls"))  # [(start s, end s, phoneme)]
"""
import re


def read_textgrid(path):
    """Praat TextGrid, long or short text format -> {tier name: [(start, end, label)]}, in file
    order. Both formats hold the same values in the same order; the long one adds `key =` labels and
    `[i]` indices, which the tokenizer skips. Point tiers give (time, time, mark)."""
    try:
        text = open(path, encoding="utf-8-sig").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    strings_or_numbers = (r'"((?:[^"]|"")*)"'  # a quoted string, "" inside for a quote
                          r'|(?<![\[\w.])(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?![\]\w])')
    tokens = [s.replace('""', '"') if n == "" else float(n)
              for s, n in re.findall(strings_or_numbers, text)]
    bad = ValueError(f"{path}: not a TextGrid in Praat's long or short text format")
    if tokens[:2] != ["ooTextFile", "TextGrid"]:
        raise bad
    try:
        pos, tiers = 5, {}
        for _ in range(int(tokens[4])):
            kind, name, n = tokens[pos], tokens[pos + 1], int(tokens[pos + 4])
            pos += 5
            step = 3 if kind == "IntervalTier" else 2
            items = [tokens[i:i + step] for i in range(pos, pos + step * n, step)]
            if step == 3:
                tiers[name] = [(a, b, lab) for a, b, lab in items]
            else:
                tiers[name] = [(t, t, m) for t, m in items]
            pos += step * n
    except (IndexError, TypeError, ValueError):
        raise bad from None
    for name, intervals in tiers.items():
        in_order(path, name, intervals)
    return tiers


def in_order(path, name, intervals):
    """Refuses a tier whose interval ends before it starts, or starts before the one before it."""
    for i, (start, end, _) in enumerate(intervals):
        if end < start:
            raise ValueError(f"{path}: tier {name!r}, interval {i + 1} ends at {end:g} s, before "
                             f"it starts ({start:g} s)")
        if i and start < intervals[i - 1][0]:
            raise ValueError(f"{path}: tier {name!r}, interval {i + 1} starts at {start:g} s, "
                             f"before interval {i} ({intervals[i - 1][0]:g} s): out of order")


PHONEMES = set("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T "
               "TH UH UW V W Y Z ZH".split())  # ARPAbet's 39


SKIPPED = ("sentence_start", "sentence_end", "br", "lg", "ls", "ns", "sp", "")  # pauses, noises


def tier(path, index):
    """Tier `index` of a ds003020 TextGrid (0 phones, 1 words) as [(start, end, label)]."""
    tiers = list(read_textgrid(path).values())
    if len(tiers) <= index:
        raise ValueError(f"{path}: has {len(tiers)} tier(s); ds003020's have phones, then words")
    return tiers[index]


def read_words(path, skip=SKIPPED):
    """The words of a ds003020 TextGrid, read as the Huth lab's dsutils does: labels lower-cased
    and stripped of braces ({BR}, {NS}, ...) before the pauses and noises in `skip` are dropped.
    [(start, end, word)]."""
    return [(a, b, lab) for a, b, lab in tier(path, 1)
            if lab.strip().lower().strip("{}") not in skip]


def read_phones(path):
    """The phones of a ds003020 TextGrid, stripped of their stress digits (AH0 -> AH), ARPAbet's
    39 phonemes and nothing else. [(start, end, phoneme)]."""
    phones = [(a, b, re.sub(r"\d", "", lab.strip().upper())) for a, b, lab in tier(path, 0)]
    return [p for p in phones if p[2] in PHONEMES]
