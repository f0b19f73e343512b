package ai.djl.memopt.checkpoint;

import java.util.Arrays;
import java.util.Collections;
import java.util.List;

/** Consecutive children of a sequential parent checkpointed as one segment: only the first one's input is kept. */
final class Span {

    private final String name;
    private final CheckpointBlock[] members;

    Span(String name, int size) {
        this.name = name;
        this.members = new CheckpointBlock[size];
    }

    void set(int index, CheckpointBlock member) {
        members[index] = member;
    }

    String name() {
        return name;
    }

    int size() {
        return members.length;
    }

    List<CheckpointBlock> members() {
        return Collections.unmodifiableList(Arrays.asList(members));
    }
}
