package ai.djl.memopt.quantize;

import java.util.Arrays;
import java.util.Locale;
import java.util.function.Function;
import java.util.stream.Collectors;

/** Parsing of the short identifiers ({@code "int4"}, {@code "awq"}) that the quantization enums carry. */
final class ShortIds {

    private ShortIds() {}

    /**
     * The constant of {@code values} whose identifier is {@code value}, ignoring case.
     *
     * @param what what the identifier names, for the error ({@code "quantization scheme"})
     * @throws IllegalArgumentException naming the unknown value and the known ones
     */
    static <E extends Enum<E>> E parse(E[] values, Function<E, String> id, String what, String value) {
        String wanted = value.toLowerCase(Locale.ROOT);
        for (E e : values) {
            if (id.apply(e).equals(wanted)) {
                return e;
            }
        }
        throw new IllegalArgumentException("unknown " + what + " '" + value + "'; known: "
                + Arrays.stream(values).map(id).collect(Collectors.joining(", ")));
    }
}
