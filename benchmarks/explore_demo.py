"""Steering with a topic latent, and attribution patching against true ablation, on the default model.

    python benchmarks/explore_demo.py --sae runs/scaling/n16384_k32 \
        --plot docs/images/attribution_vs_ablation_smollm2.png

1. Topic latent: the latent whose mean activation on ``--topic-text`` exceeds its mean on
   held-out Wikipedia the most (the browser's "search by text", done here in code). It is then
   added (``saelab steer --mode add``) at ``--strength`` x its largest activation on the topic text
   at every position while the model continues ``--prompt``, next to the same sample without
   steering (same seed).
2. Attribution: for each prompt below the metric is the logit difference of two next tokens (the
   right answer minus a plausible wrong one). Attribution patching gives every latent's activation
   x gradient in one forward and backward; up to ``--max-latents`` active latents per prompt are
   zero-ablated (batched) and their true effect measured. Pearson and Spearman correlation over all
   (latent, prompt) pairs, and a scatter plot.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info  # noqa: E402

# (prompt, right next token, wrong next token): factual recall, indirect object, agreement, antonyms.
PROMPTS = [
    ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    ("After the meeting, Sarah and Tom walked home. Tom handed the keys to", " Sarah", " Tom"),
    ("The capital of France is", " Paris", " London"),
    ("The Eiffel Tower is located in the city of", " Paris", " Rome"),
    ("The keys to the old cabinet", " are", " is"),
    ("The author of the books on the shelf", " is", " are"),
    ("Two plus two equals", " four", " five"),
    ("The opposite of hot is", " cold", " warm"),
]
TOPIC_TEXT = ("The band released their second album in 1994. The guitarist wrote most of the songs, and the "
              "single reached number one on the charts. They toured with a new drummer and recorded a live "
              "album of the concert. The singer later began a solo career in pop music.")


def topic_latent(lm, sae, text: str, n_baseline_tokens: int = 16_384) -> tuple[int, float]:
    """(latent, its max activation on the text) most specific to the text against held-out Wikipedia."""
    from saelab.data import default_corpus, token_contexts

    hook = sae.cfg.hook_name
    with torch.no_grad():
        ids = torch.tensor([[lm.bos_token_id] + lm.tokenize([text])[0]])
        z_topic = sae.encode(lm.activations(ids, hook)[0, 1:])
        base = token_contexts(default_corpus("eval"), lm.tokenize, 64, n_tokens=n_baseline_tokens,
                              bos_token_id=lm.bos_token_id)
        z_base = torch.cat([sae.encode(lm.activations(base[i:i + 16], hook)[:, 1:]).reshape(-1, sae.n_latents)
                            for i in range(0, base.shape[0], 16)])
    score = z_topic.mean(0) - z_base.mean(0)
    latent = int(score.argmax())
    return latent, float(z_topic[:, latent].max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", required=True, help="run folder, SAE folder or OpenAI .pt of an SAE on the default model")
    ap.add_argument("--model", default=None, help="language model (default: the SAE's own)")
    ap.add_argument("--topic-text", default=TOPIC_TEXT, help="text whose most specific latent is steered with")
    ap.add_argument("--prompt", default="Yesterday I went to", help="prompt continued with and without steering")
    ap.add_argument("--strength", type=float, default=2.0, help="added amount, in units of the latent's max activation")
    ap.add_argument("--samples", type=int, default=3, help="steering samples (seeds 0, 1, ...)")
    ap.add_argument("--max-latents", type=int, default=64, help="latents ablated per attribution prompt")
    ap.add_argument("--plot", default="attribution_vs_ablation.png", help="scatter plot PNG")
    args = ap.parse_args()

    from saelab.explore.attribution import compare_attribution_with_ablation, latent_logit_effects, logit_diff
    from saelab.explore.steering import generate_with_and_without, prompt_tokens, steer
    from saelab.models import load_model
    from saelab.run_folder import model_for, open_sae

    print(machine_info())
    print(f"Command: `{command_line()}`\n")
    t0 = time.perf_counter()
    sae, _ = open_sae(args.sae)
    lm = load_model(args.model or model_for(sae))
    sae = sae.to(lm.device)
    latent, top_act = topic_latent(lm, sae, args.topic_text)
    value = args.strength * top_act
    promoted = [t for t, _, _ in latent_logit_effects(lm, sae, latent, top=10)["promoted"]]
    print(f"topic latent {latent} (max activation {top_act:.2f} on the topic text); promotes {promoted}")
    # the value as repr() writes it and the rest shell-quoted: pasted, the command steers by the same float32
    model = f" --model {shlex.quote(args.model)}" if args.model else ""
    print(f"same as: saelab steer {shlex.quote(args.sae)} --latent {latent} --value {value!r} "
          f"--prompt {shlex.quote(args.prompt)} --samples {args.samples}{model}\n")
    s = steer(lm, sae, latent, "add", value)
    for seed in range(args.samples):
        print(f"=== sample {seed + 1} (seed {seed}) ===")
        print(generate_with_and_without(lm, args.prompt, s, seed=seed).format())
    t1 = time.perf_counter()

    cases = [(prompt_tokens(lm, p), logit_diff(lm, a, b)) for p, a, b in PROMPTS]
    title = f"{Path(args.sae).name}: {sae.n_latents} latents at {sae.cfg.hook_name}, {len(PROMPTS)} logit-difference prompts"
    res = compare_attribution_with_ablation(lm, sae, cases, max_latents=args.max_latents, plot=args.plot, title=title)
    t2 = time.perf_counter()
    print(f"attribution vs ablation: {res['n']} (latent, prompt) pairs over {len(PROMPTS)} prompts; "
          f"Pearson r = {res['pearson']:.3f}, Spearman rho = {res['spearman']:.3f}; plot {res['plot']}")
    print(f"wall: steering part {t1 - t0:.1f} s, attribution + ablations {t2 - t1:.1f} s")


if __name__ == "__main__":
    main()
