package com.example;

import ai.djl.memopt.quantize.Int8WeightOnlyConfig;
import ai.djl.memopt.quantize.QuantizationReport;
import ai.djl.memopt.quantize.Quantizer;
import ai.djl.ndarray.NDManager;
import ai.djl.ndarray.types.DataType;
import ai.djl.ndarray.types.Shape;
import ai.djl.nn.Activation;
import ai.djl.nn.SequentialBlock;
import ai.djl.nn.core.Linear;

/** A user's program: builds a small DJL model and quantizes it with djl-memopt. */
public final class QuantizeMyModel {

    private QuantizeMyModel() {}

    public static void main(String[] args) {
        try (NDManager manager = NDManager.newBaseManager()) {
            SequentialBlock net = new SequentialBlock()
                    .add(Linear.builder().setUnits(64).build())
                    .add(Activation::relu)
                    .add(Linear.builder().setUnits(10).build());
            net.initialize(manager, DataType.FLOAT32, new Shape(4, 32));
            QuantizationReport report = Quantizer.quantize(net, Int8WeightOnlyConfig.builder().build());
            System.out.println("quantized " + report.layers().size() + " layers");
        }
    }
}
