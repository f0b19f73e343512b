package ai.djl.memopt;
import ai.djl.ndarray.*;
import ai.djl.ndarray.types.*;
import org.junit.jupiter.api.Test;
import static org.junit.jupiter.api.Assertions.*;
class SmokeTest {
  @Test void engineLoadsOffline() {
    try (NDManager m = NDManager.newBaseManager()) {
      NDArray a = m.create(new float[]{1,2,3});
      assertEquals(6f, a.sum().getFloat());
      System.out.println(m.getEngine().getEngineName() + " " + m.getEngine().getVersion());
    }
  }
}
