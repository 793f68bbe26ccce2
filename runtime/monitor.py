"""TensorBoard logs of a search: scalars per step and per epoch, alpha heatmaps, the genotype as text."""

import os

import tensorflow as tf

SCALARS = ("train_loss", "arch_loss", "grad_norm", "arch_grad_norm")


class TensorBoard:
    """Writes ``run_dir/tensorboard``; ``tensorboard --logdir run_dir/tensorboard`` shows it."""

    def __init__(self, run_dir, operations, edge_labels):
        self.writer = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))
        self.operations = list(operations)
        self.edge_labels = list(edge_labels)  # "source->target" per alpha row

    def step(self, iteration, values):
        with self.writer.as_default(step=iteration):
            for key in SCALARS:
                if key in values:
                    tf.summary.scalar(f"step/{key}", values[key])

    def epoch(self, record):
        from .figures import figure_png, heatmap_figure

        epoch = record["epoch"]
        with self.writer.as_default(step=epoch):
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    tf.summary.scalar(f"epoch/{key}", value)
            for cell_type, probabilities in record["alpha_softmax"].items():
                figure = heatmap_figure(probabilities, self.operations, self.edge_labels,
                                        f"softmax(alpha_{cell_type}), epoch {epoch}")
                image = tf.image.decode_png(figure_png(figure), channels=4)
                tf.summary.image(f"alphas/{cell_type}", image[None], step=epoch)
            tf.summary.text("genotype", record["genotype"])
        self.writer.flush()

    def close(self):
        self.writer.close()
