"""Course exercises: a copy of the repository in which one equation's function is left for a student to write.

`python exercises.py list` names the exercises: each of the paper's Eq. (1)-(10), the Hungarian matching cost and
the reference multi-scale deformable attention. `python exercises.py eq7 --out hw/` writes a copy of the project
(its Python files, requirements, README and docs/; no git history, caches or training outputs) into hw/, in which
that function keeps its signature and docstring while its body is a stub that raises NotImplementedError naming
the equation, and prints the `pytest` command whose known-answer tests grade a solution (run inside the copy).
`python exercises.py list --markdown` prints docs/exercises.md.

The functions are found in the source text with `ast` (nothing of the project is imported to find them); their
grading tests are existing tests of the suite, named by node id. test_exercises.py proves every exercise: the
stub fails each of its grading tests, the original passes them.

No equations of its own: it points at the functions that hold them. No tensors (no shape legend).
Deviations from the paper: none.
"""
import ast
import os
import shlex
import shutil
import sys
import tempfile
from typing import NamedTuple

from errors import ArgumentParser, InputError, error_line

HERE = os.path.dirname(os.path.abspath(__file__))


class Exercise(NamedTuple):
    name: str         # what the command line calls it
    equation: str     # what the stub names
    what: str         # one line: what the function computes
    path: str         # the file, relative to the repository root
    function: str     # its qualified name in that file: Class.method or function
    tests: tuple      # pytest node ids of its known-answer tests (a bare test name covers all its parameters)


EXERCISES = (
    Exercise("eq1", "Eq. (1)", "object encoded feature z_enc: ROI-pooled memory, averaged over the levels",
             "alignnet.py", "AlignNet.object_encoded_feature",
             ("test_alignnet.py::test_encoded_feature_is_mean_inside_box_averaged_over_levels",
              "test_alignnet.py::test_encoded_feature_ignores_padding")),
    Exercise("eq2", "Eq. (2)", "f_cat = concat(f_cls[label], [w, h])",
             "alignnet.py", "AlignNet.object_attribute_input",
             ("test_alignnet.py::test_attribute_feature_shapes",
              "test_alignnet.py::test_attribute_feature_feeds_label_row_and_box_size")),
    Exercise("eq3", "Eq. (3)", "z_attr = Linear(f_cat)",
             "alignnet.py", "AlignNet.object_attribute_feature",
             ("test_alignnet.py::test_attribute_feature_is_the_linear_layer_of_f_cat",
              "test_alignnet.py::test_attribute_feature_shapes",
              "test_alignnet.py::test_attribute_feature_feeds_label_row_and_box_size")),
    Exercise("eq4", "Eq. (4)", "similarity A = beta * normalize(z_enc) normalize(z_attr)^T",
             "alignnet.py", "AlignNet.similarity",
             ("test_alignnet.py::test_loss_matches_hand_computation",
              "test_alignnet.py::test_beta_starts_at_clip_value_and_is_capped")),
    Exercise("eq5", "Eq. (5)", "L_AlignNet: cross entropy of A against the identity along both axes",
             "alignnet.py", "AlignNet.alignment_loss",
             ("test_alignnet.py::test_loss_matches_hand_computation",
              "test_alignnet.py::test_aligned_pairs_give_lower_loss_than_shuffled",
              "test_alignnet.py::test_forward_with_one_instance_per_image_trains_attr_proj")),
    Exercise("eq6", "Eq. (6)", "DynQuery content sqrt(beta) * eps + sqrt(1 - beta) * z_hat",
             "dynql.py", "DynQL.content",
             ("test_dynql.py::test_content_mean_and_variance",
              "test_dynql.py::test_forward_lays_out_sets_per_image_in_gt_order",
              "test_dynql.py::test_beta_spectrum_from_informed_to_uninformed")),
    Exercise("eq7", "Eq. (7)", "DynQuery position: the GT box jittered by lambda ~ U(0, rho)",
             "dynql.py", "DynQL.position",
             ("test_dynql.py::test_position_jitter_bounded_by_rho_theta",
              "test_dynql.py::test_position_without_jitter_is_the_gt_box",
              "test_dynql.py::test_position_boxes_at_the_border_keep_positive_size",
              "test_dynql.py::test_position_boxes_at_the_border_stay_inside_the_image")),
    Exercise("eq8", "Eq. (8)", "DynQuery positional query Linear(PE(p))",
             "dynql.py", "DynQL.positional_query",
             ("test_dynql.py::test_dynquery_positional_query_is_the_conventional_query_at_the_same_box",)),
    Exercise("eq9", "Eq. (9)", "the decoder's attention mask over [q ; DynQuery set 1 ; ... ; set S]",
             "dynql.py", "attention_mask",
             ("test_dynql.py::test_attention_mask_known_answer",
              "test_dynql.py::test_decoder_dynqueries_never_reach_conventional_queries",
              "test_dynql.py::test_decoder_set_2_never_reaches_set_1",
              "test_dynql.py::test_decoder_padded_dynqueries_never_reach_anything",
              "test_dynql.py::test_decoder_set_1_sees_itself_and_conventional_queries_reach_sets")),
    Exercise("eq10", "Eq. (10)", "L_DynQL: direct assignment, every decoder layer, normalized by S x N",
             "dynql.py", "dynql_loss",
             ("test_dynql.py::test_loss_keys_and_each_layer_scored_on_its_own_output",
              "test_dynql.py::test_loss_normalized_by_sets_times_instances",
              "test_dynql.py::test_loss_ignores_padded_slots",
              "test_dynql.py::test_model_dynquery_slot_s_i_is_supervised_by_gt_i")),
    Exercise("matching-cost", "the Hungarian matching cost of §3.1",
             "2 * focal class cost + 5 * L1 + 2 * (-GIoU) of every prediction against every GT box",
             "matcher.py", "HungarianMatcher.cost_matrix",
             ("test_matcher.py::test_focal_class_cost_and_box_costs_known_answer",
              "test_matcher.py::test_cxcywh_to_xyxy_known_answer_and_a_giou_that_tells_centres_from_corners",
              "test_matcher.py::test_matching_is_the_optimum_over_all_permutations",
              "test_matcher.py::test_batched_matching_equals_per_image_matching")),
    Exercise("deformable-attention", "the multi-scale deformable attention of §3.1 (Zhu et al., Eq. 3)",
             "the readable reference: bilinear samples of every level, weighted and summed",
             "model.py", "ms_deform_attn_pytorch",
             ("test_model.py::test_ms_deform_attn_equals_naive_bilinear_loop",
              "test_model.py::test_ms_deform_attn_gradcheck")),
)
BY_NAME = {exercise.name: exercise for exercise in EXERCISES}

# What a copy holds: the project's files at the top level, and docs/. Nothing else (no .git, caches, outputs).
COPIED_SUFFIXES = (".py", ".txt", ".md")
COPIED_FOLDERS = ("docs",)


def grading_command(exercise):
    """The pytest command, run inside a copy, whose tests grade `exercise`."""
    return "python -m pytest -q " + " ".join(exercise.tests)


def find_function(tree, qualname):
    """The FunctionDef of `qualname` ('Class.method' or 'function') among a module's top-level statements."""
    scope, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise LookupError(f"{qualname}: no {part!r} found")
        scope = node.body
    if not isinstance(node, ast.FunctionDef):
        raise LookupError(f"{qualname} is a class, expected a function")
    return node


def stub_source(source, exercise):
    """`source` with the body of `exercise.function` after its docstring replaced by one `raise` naming the
    equation; everything else (signature, decorators, docstring, the rest of the file) is kept byte for byte."""
    function = find_function(ast.parse(source), exercise.function)
    docstring = function.body[0]
    if not (isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
            and isinstance(docstring.value.value, str)) or len(function.body) < 2:
        raise LookupError(f"{exercise.function}: expected a docstring followed by a body")
    lines = source.splitlines(keepends=True)
    indent = " " * docstring.col_offset
    message = f"{exercise.equation}: implement {exercise.function} (exercise {exercise.name})"
    stub = f"{indent}raise NotImplementedError({message!r})\n"
    # Lines are 1-based; the body runs from the line after the docstring to the function's last line, comments
    # among its statements included (they explain the solution).
    return "".join(lines[:docstring.end_lineno] + [stub] + lines[function.end_lineno:])


def project_files(root=HERE):
    """Paths, relative to `root`, of what a copy holds: top-level project files and the docs/ tree."""
    files = [name for name in sorted(os.listdir(root))
             if name.endswith(COPIED_SUFFIXES) and os.path.isfile(os.path.join(root, name))]
    for folder in COPIED_FOLDERS:
        for parent, dirs, names in os.walk(os.path.join(root, folder)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
            files += [os.path.relpath(os.path.join(parent, n), root) for n in sorted(names) if not n.startswith(".")]
    return files


def check_out(out, root=HERE):
    """--out must be a new or empty folder outside the repository: a copy inside it would be copied into itself
    and picked up by the repository's own test run; one over existing files would mix with them."""
    real, repo = os.path.realpath(out), os.path.realpath(root)
    if real == repo or real.startswith(repo + os.sep):
        raise InputError(f"--out {out} is inside the repository {root}: expected a folder outside it")
    if os.path.exists(real) and not os.path.isdir(real):
        raise InputError(f"--out {out} is a file: expected a new or empty folder")
    if os.path.isdir(real) and os.listdir(real):
        raise InputError(f"--out {out} is a folder that is not empty: expected a new or empty folder")


def write_exercise(exercise, out, root=HERE):
    """Write the copy of `root` for `exercise` into `out` (checked by `check_out`); returns the grading command.

    The copy is made in a temporary folder beside `out` and moved into place in one step: an interrupted or failed
    write leaves no half copy."""
    check_out(out, root)
    real = os.path.realpath(out)
    parent = os.path.dirname(real)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.", dir=parent)
    except OSError as err:
        raise InputError(f"--out {out}: cannot create it ({err.strerror or err})") from None
    try:
        for rel in project_files(root):
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, rel), os.path.join(tmp, rel))
        with open(os.path.join(root, exercise.path)) as f:
            source = f.read()
        with open(os.path.join(tmp, exercise.path), "w") as f:
            f.write(stub_source(source, exercise))
        if os.path.isdir(real):
            os.rmdir(real)  # empty (check_out): replaced by the finished copy
        os.rename(tmp, real)
    except OSError as err:
        raise InputError(f"--out {out}: cannot write the copy ({err.strerror or err}); nothing was left there") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return grading_command(exercise)


def listing():
    """The exercises as plain text, one block each."""
    blocks = []
    for e in EXERCISES:
        blocks.append(f"{e.name:<22}{e.path}:{e.function} ({e.equation}: {e.what})\n"
                      f"{'':<22}graded by: {grading_command(e)}")
    return "\n".join(blocks)


def markdown():
    """docs/exercises.md: every exercise, its function, its equation and its grading command."""
    lines = [
        "# Exercises for a course",
        "",
        "`python exercises.py NAME --out DIR` writes a copy of the repository into DIR (a new or empty folder outside",
        "the repository) in which the function of exercise NAME keeps its signature and docstring while its body",
        "raises `NotImplementedError` naming the equation; a student writes the body, then runs the grading command",
        "inside DIR. The grading tests are known-answer tests of the suite (hand computations, a naive loop, the",
        "paper's invariants); `test_exercises.py` proves each exercise: its stub fails every grading test and the",
        "original passes them. This page is `python exercises.py list --markdown`; a test keeps it so.",
        "",
        "| exercise | equation | function | what it computes |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{e.name}` | {e.equation} | `{e.path}:{e.function}` | {e.what} |" for e in EXERCISES]
    lines += ["", "## Grading commands", ""]
    for e in EXERCISES:
        lines += [f"`{e.name}`:", "", "```bash", f"python exercises.py {e.name} --out hw/ && cd hw/",
                  grading_command(e).replace(" test_", " \\\n    test_"), "```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def get_parser():
    p = ArgumentParser("exercises.py", description=__doc__.split("\n")[0])
    p.add_argument("exercise", choices=["list", *BY_NAME], help="'list', or the exercise to write")
    p.add_argument("--out", default=None, metavar="DIR", help="a new or empty folder outside the repository")
    p.add_argument("--markdown", action="store_true", help="with 'list': print docs/exercises.md")
    return p


def main(argv=None):
    cli = get_parser().parse_args(argv)
    if cli.exercise == "list":
        if cli.out:
            raise InputError("--out writes an exercise: name one (python exercises.py list names them)")
        print(markdown() if cli.markdown else listing(), end="" if cli.markdown else "\n")
        return None
    if cli.markdown:
        raise InputError("--markdown goes with 'list'")
    if not cli.out:
        raise InputError(f"exercise {cli.exercise} needs --out DIR: a new or empty folder outside the repository")
    exercise = BY_NAME[cli.exercise]
    command = write_exercise(exercise, cli.out)
    print(f"wrote {cli.out}: a copy of the repository in which {exercise.path}:{exercise.function} "
          f"({exercise.equation}: {exercise.what}) raises NotImplementedError.")
    print("Write its body, then grade it inside the copy:")
    print(f"cd {shlex.quote(cli.out)} && {command}")
    return command


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit status 2; bugs keep their traceback."""
    try:
        return main(argv)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
