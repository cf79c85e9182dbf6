"""sos's metric definitions, shared by the compat scripts so that every engine is scored alike."""


def similarity(a, b):
    """`1 - levenshtein(a, b) / max(len)`, over characters (sos's `metrics::similarity`)."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))
