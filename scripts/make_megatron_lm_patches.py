"""Make patches/megatron-lm-*.patch: take each group's oldest ref from a Megatron-LM git directory, insert
our lines after fixed anchor lines (each asserted unique), and `git diff` the result. From core_v0.18.0 the
patches also cover pretrain_hybrid.py and its HybridModel builder (hybrid_builders.py up to core_v0.18.2,
megatron/training/models/hybrid.py from core_v0.19.0).

    python scripts/make_megatron_lm_patches.py MEGATRON_LM_GIT_DIR OUT_DIR   # e.g. OUT_DIR = patches

MEGATRON_LM_GIT_DIR: a clone (or bare repository) of https://github.com/NVIDIA/Megatron-LM with the tags.
`training.py` is diffed with one line of context, so that one patch applies to both refs of a group (see
docs/megatron_lm.md, "What the patch changes"); check every ref of patches/megatron-lm.index after a change.
Nothing of Megatron-LM is written to OUT_DIR but the diffs.
"""
import os
import shutil
import subprocess
import sys
import tempfile

G = sys.argv[1]
MARK = "  # megatron-moe-spec"
IMPORT = "from megatron_moe_spec import megatron_lm as moe_spec" + MARK


def insert_after(text, anchor, lines, count=1):
    assert text.count(anchor) == count, (anchor, text.count(anchor))
    i = text.index(anchor) + len(anchor)
    assert text[i] == "\n"
    return text[:i + 1] + "".join(l + "\n" for l in lines) + text[i + 1:]


def replace(text, old, new):
    assert text.count(old) == 1, old
    return text.replace(old, new)


HOOKS = ["        track_names = moe_spec.track_names(args, track_names)" + MARK,
         "        moe_spec.report_coupling_as_pair_mean(args)" + MARK,
         "        moe_spec.log_specialization_metrics(iteration, writer, wandb_writer)" + MARK]
ZLOSS = '            track_names.append("z_loss")'
PROVIDER_OLD = "        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,\n"
PROVIDER_NEW = ("        extra_args_provider=moe_spec.chain_extra_args_provider(add_modelopt_args if has_nvidia_modelopt else None),"
                + MARK + "\n")


def edit_pretrain(t):
    t = insert_after(t, "from model_provider import model_provider", [IMPORT])
    return replace(t, PROVIDER_OLD, PROVIDER_NEW)


def edit_training(t, import_anchor):
    t = insert_after(t, import_anchor, [IMPORT])
    return insert_after(t, ZLOSS, HOOKS)


def edit_model_builder(t, import_anchor, spec_anchor, spec_line, model_end, indent, returns=False):
    """Our import after ``import_anchor``, ``spec_line`` (our spec of the layers) after ``spec_anchor``, and
    ``moe_spec.register_model(model)`` (then ``return model`` if ``returns``) after ``model_end`` (the
    close of the model's constructor call), at ``indent`` spaces."""
    t = insert_after(t, import_anchor, [IMPORT])
    t = insert_after(t, spec_anchor, [spec_line + MARK])
    assert t.count(model_end) == 1, t.count(model_end)
    i = t.index(model_end) + len(model_end)
    tail = ["moe_spec.register_model(model)"] + (["return model"] if returns else [])
    return t[:i] + "".join(" " * indent + line + MARK + "\n" for line in tail) + t[i:]


def edit_builders(t, indent):
    sp = " " * indent
    return edit_model_builder(
        t, "from megatron.training.yaml_arguments import core_transformer_config_from_yaml",
        sp + "        transformer_layer_spec = _get_transformer_layer_spec(use_te, config)",
        sp + "transformer_layer_spec = moe_spec.specialize_layer_spec(transformer_layer_spec, config, vp_stage)",
        sp + "    pg_collection=pg_collection,\n" + sp + ")\n", indent)


def edit_gpt_model_builder(t):
    return edit_model_builder(
        t, "from megatron.training.vocab_utils import calculate_padded_vocab_size",
        "                transformer_layer_spec = transformer_layer_spec(self._model_config)",
        "        transformer_layer_spec = moe_spec.specialize_layer_spec(transformer_layer_spec, self._model_config, vp_stage)",
        "            pg_collection=pg_collection,\n            vp_stage=vp_stage,\n        )\n", 8)


def edit_hybrid_builders(t):
    """core_v0.18.x: hybrid_builders.hybrid_builder (pretrain_hybrid.py builds through model_provider)."""
    return edit_model_builder(
        t, "from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_inference_stack_spec",
        '        raise ValueError("You must provide a valid hybrid layer spec via --spec")',
        "    hybrid_stack_spec = moe_spec.specialize_hybrid_stack_spec(hybrid_stack_spec, config, vp_stage)",
        "        vp_stage=vp_stage,\n    )\n", 4)


def edit_hybrid_model_builder(t):
    """core_v0.19.0 and later: megatron/training/models/hybrid.py, HybridModelBuilder.build_model (which
    returned the model it built: it keeps it, registers it, then returns it)."""
    t = replace(t, "        return HybridModel(\n", "        model = HybridModel(" + MARK + "\n")
    return edit_model_builder(
        t, "from megatron.training.vocab_utils import calculate_padded_vocab_size",
        "                hybrid_stack_spec = default_hybrid_stack_spec",
        "        hybrid_stack_spec = moe_spec.specialize_hybrid_stack_spec(hybrid_stack_spec, self._model_config, vp_stage)",
        "            vp_stage=vp_stage,\n        )\n", 8, returns=True)


# patch name: (base tag, {path: (edit, context lines)})
PATCHES = {
    "megatron-lm-core_v0.16.1-core_v0.17.1.patch": ("core_v0.16.1", {
        "gpt_builders.py": (lambda t: edit_builders(t, 8), 3),
        "megatron/training/training.py": (lambda t: edit_training(
            t, "from megatron.core.transformer.moe.moe_utils import track_moe_metrics, clear_aux_losses_tracker"), 1),
        "pretrain_gpt.py": (edit_pretrain, 3),
    }),
    "megatron-lm-core_v0.18.0-core_v0.18.2.patch": ("core_v0.18.0", {
        "gpt_builders.py": (lambda t: edit_builders(t, 4), 3),
        "megatron/training/training.py": (lambda t: edit_training(
            t, "from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker"), 1),
        "pretrain_gpt.py": (edit_pretrain, 3),
        "hybrid_builders.py": (edit_hybrid_builders, 3),
        "pretrain_hybrid.py": (edit_pretrain, 3),
    }),
    "megatron-lm-core_v0.19.0-main.patch": ("core_v0.19.0", {
        "megatron/training/models/gpt.py": (edit_gpt_model_builder, 3),
        "megatron/training/training.py": (lambda t: edit_training(
            t, "from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker"), 1),
        "pretrain_gpt.py": (edit_pretrain, 3),
        "megatron/training/models/hybrid.py": (edit_hybrid_model_builder, 3),
        "pretrain_hybrid.py": (edit_pretrain, 3),
    }),
}


out = os.path.abspath(sys.argv[2])
scratch = tempfile.mkdtemp()
for name, (tag, files) in PATCHES.items():
    work = os.path.join(scratch, tag)
    os.makedirs(work)
    run = lambda *a: subprocess.run(a, cwd=work, check=True, capture_output=True, text=True).stdout
    run("git", "init", "-q")
    for path in files:
        os.makedirs(os.path.join(work, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(work, path), "w") as f:
            f.write(subprocess.run(["git", "--git-dir", G, "show", f"{tag}:{path}"], check=True,
                                   capture_output=True, text=True).stdout)
    run("git", "add", "-A")
    diff = ""
    for path, (edit, ctx) in sorted(files.items(), key=lambda kv: kv[0]):
        p = os.path.join(work, path)
        with open(p) as f:
            text = f.read()
        with open(p, "w") as f:
            f.write(edit(text))
        diff += run("git", "-c", "core.abbrev=7", "diff", f"-U{ctx}", "--", path)
    with open(os.path.join(out, name), "w") as f:
        f.write(diff)
    print(name, "from", tag)
shutil.rmtree(scratch)
