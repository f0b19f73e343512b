package ai.djl.memopt.examples.cli;

import com.google.common.collect.ImmutableSet;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.Comparator;
import java.util.IdentityHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import picocli.CommandLine;
import picocli.CommandLine.Help;
import picocli.CommandLine.Model.ArgSpec;
import picocli.CommandLine.Model.CommandSpec;
import picocli.CommandLine.Model.OptionSpec;

/**
 * The tool's usage help: picocli's, with the old option names left out. Every concept has one name across the
 * commands; a name it had before is still accepted, as a second name of the same option, but help shows only the
 * current one. Picocli has no hidden alias of its own, hence this list and the help that drops it.
 */
final class MemoptHelp extends Help {

    /** Old names, accepted and never shown; each is a second name of an option whose first name is current. */
    static final Set<String> HIDDEN_ALIASES = ImmutableSet.of(
            "--precision", // --dtype
            "--save", // --out
            "--new-tokens", "--max-tokens", // --max-new-tokens
            "--heldout", // --held-out
            "--lora", // --lora-rank
            "--quantize"); // --quantize-base

    /** Installs the help on {@code cli} and every subcommand under it. */
    static void install(CommandLine cli) {
        cli.setHelpFactory(MemoptHelp::new);
    }

    private MemoptHelp(CommandSpec spec, ColorScheme colorScheme) {
        super(spec, colorScheme);
    }

    /** {@code option} as help shows it: without its hidden aliases (the option itself when it has none). */
    static OptionSpec visible(OptionSpec option) {
        String[] names = Arrays.stream(option.names()).filter(n -> !HIDDEN_ALIASES.contains(n)).toArray(String[]::new);
        if (names.length == option.names().length) {
            return option;
        }
        if (names.length == 0) {
            throw new IllegalStateException("option " + String.join("/", option.names()) + " has only hidden names");
        }
        return OptionSpec.builder(option).names(names).build();
    }

    private static List<OptionSpec> visible(Collection<OptionSpec> options) {
        List<OptionSpec> out = new ArrayList<>(options.size());
        for (OptionSpec o : options) {
            out.add(visible(o));
        }
        return out;
    }

    @Override
    public Layout createDefaultLayout() {
        return createDefaultLayout(visible(commandSpec().options()), commandSpec().positionalParameters(), colorScheme());
    }

    @Override
    public String optionListExcludingGroups(List<OptionSpec> optionList, Layout layout,
            Comparator<OptionSpec> optionSort, IParamLabelRenderer valueLabelRenderer) {
        return super.optionListExcludingGroups(visible(optionList), layout, optionSort, valueLabelRenderer);
    }

    @Override
    protected Ansi.Text createDetailedSynopsisOptionsText(Collection<ArgSpec> done, List<OptionSpec> optionList,
            Comparator<OptionSpec> optionSort, boolean clusterBooleanOptions) {
        Map<ArgSpec, Boolean> shown = new IdentityHashMap<>();
        for (ArgSpec a : done) {
            shown.put(a, true);
        }
        List<OptionSpec> remaining = new ArrayList<>();
        for (OptionSpec o : optionList) {
            if (!shown.containsKey(o)) {
                remaining.add(o);
            }
        }
        return super.createDetailedSynopsisOptionsText(List.of(), visible(remaining), optionSort,
                clusterBooleanOptions);
    }
}
