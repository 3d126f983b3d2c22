"""Evaluation: COCO AP with pycocotools, gathered over ranks (paper §4, Tables 1-9).

`evaluate(...)` is what training calls after an epoch; `python evaluate.py --resume CKPT [--dataset ...]`
rebuilds the model from the checkpoint's own arguments and evaluates it alone.

Shape legend: B batch, Q queries, K classes.

Deviations from the paper: none; AP is pycocotools' COCOeval on bounding boxes, as everyone reports it.
"""
import argparse
import contextlib
import io
import json
import os
import sys

import torch
import torch.distributed as dist
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def gather_predictions(store):
    """Merge {image_id: prediction} from every rank; the padded sampler's repeated images collapse."""
    if not (dist.is_available() and dist.is_initialized()):
        return store
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, store)
    return {k: v for part in parts for k, v in part.items()}


def to_coco_results(predictions, cat_ids):
    """Post-processed predictions {image_id: {scores, labels, boxes xyxy}} -> COCO results list (xywh)."""
    results = []
    for image_id, pred in predictions.items():
        boxes = pred["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for score, label, box in zip(pred["scores"].tolist(), pred["labels"].tolist(), boxes.tolist()):
            results.append({"image_id": int(image_id), "category_id": int(cat_ids[label]),
                            "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    return results


def coco_stats(coco_gt, results, image_ids=None, cat_ids=None):
    """The 12 COCOeval numbers (AP, AP50, AP75, APs, APm, APl, AR...); all -1 when there is nothing to score."""
    if not results:
        return [0.0] * 12
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        if cat_ids is not None:
            ev.params.catIds = sorted(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


@torch.no_grad()
def predict(model, postprocess, loader, device, per_layer=False):
    """Run the detector over a loader. Returns {image_id: prediction} for the last layer, and per layer if asked."""
    model.eval()
    layers = None
    final = {}
    for images, mask, targets in loader:
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        ids = [int(t["image_id"]) for t in targets]
        heads = (outputs.get("aux_outputs", []) + [outputs]) if per_layer else [outputs]
        if layers is None:
            layers = [{} for _ in heads]
        for store, head in zip(layers, heads):
            for image_id, pred in zip(ids, postprocess(head, sizes)):
                store[image_id] = {k: v.cpu() for k, v in pred.items()}
    final = layers[-1] if layers else final
    return final, layers


def evaluate(model, postprocess, loader, dataset, device, per_layer=False):
    """COCO stats (12 numbers) of the last decoder layer; with per_layer, a list of them, one per layer."""
    final, layers = predict(model, postprocess, loader, device, per_layer)
    per = []
    for store in (layers if per_layer else [final]):
        store = gather_predictions(store)
        per.append(coco_stats(dataset.coco, to_coco_results(store, dataset.cat_ids), list(store)))
    return per if per_layer else per[0]


def print_coco_table(stats, title="COCO bbox"):
    print(f"{title}\n" + " ".join(f"{n:>6}" for n in STAT_NAMES) + "\n"
          + " ".join(f"{100 * s:6.1f}" for s in stats[:6]))


def get_parser():
    p = argparse.ArgumentParser("CLIP-DETR evaluation")
    p.add_argument("--resume", required=True, metavar="CKPT", help="a checkpoint written by train.py")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data-path", default=None)
    p.add_argument("--val-json", default=None)
    p.add_argument("--val-images", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--attn-impl", default=None, choices=["auto", "pytorch", "triton"])
    p.add_argument("--output", default=None, metavar="JSON", help="write the COCO results JSON here")
    return p


def main(argv=None):
    import data
    import train
    cli = get_parser().parse_args(argv)
    ckpt = train.load_checkpoint(cli.resume)
    args = argparse.Namespace(**ckpt["args"])
    for key in ("dataset", "data_path", "val_json", "val_images", "device", "batch_size", "attn_impl"):
        if getattr(cli, key) is not None:
            setattr(args, key, getattr(cli, key))
    args.num_workers = cli.num_workers
    args.method = "baseline"  # inference is plain Deformable DETR: the training modules are not built
    dataset = data.build_dataset("val", args)
    model, _, postprocess = train.build_model(args, dataset.cat_names)
    train.load_model_state(model, ckpt["model"], cli.resume)
    device = torch.device(args.device)
    model.to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=data.collate_fn,
                                         num_workers=cli.num_workers)
    final, _ = predict(model, postprocess, loader, device)
    results = to_coco_results(final, dataset.cat_ids)
    stats = coco_stats(dataset.coco, results, list(final))
    print_coco_table(stats, title=f"{args.dataset} val")
    if cli.output:
        tmp = cli.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, cli.output)
        print(f"wrote {len(results)} detections to {cli.output}")
    return stats


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
